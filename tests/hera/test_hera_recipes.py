"""The shipped recipes (recipes/*.yaml): they parse, they train, and everything they reference exists.

- Every recipe goes through LLaMA-Factory's own argument reader and parser with the plugin's split of the
  ``hera_*`` keys, exactly as ``llamafactory-cli train recipes/<name>.yaml`` does before any model loads.
- For every model family (``model_type``) a recipe uses, one recipe of that family trains 2 steps with the
  stock ``llamafactory-cli train`` on a tiny random model of the same ``model_type``: only the model path,
  data, sizes, output folder, teacher and precision are overridden; everything else (template, finetuning
  type, LoRA / freeze settings, every ``hera_*`` key including ``hera_heads: auto``) is the recipe's.
- A lint: names, required keys, paths (relative to the repository root), comments, docs/hera.md table.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, read_trainer_log, run_train
from llamafactory_hera.fixtures import TinyAssets
from llamafactory_hera_testing.families import (
    EXTRA_FAMILIES,
    EXTRA_MODEL_NAMES,
    build_extra_families,
    build_extra_model,
)

RECIPES = REPO / "recipes"
RECIPE_FILES = sorted(p.name for p in RECIPES.glob("*_hera*.yaml"))  # stage: hera recipes (rah: tests/rah)
NAME = re.compile(r"^(?P<stem>[a-z0-9_]+?_\d+b)_hera(?P<variant>_full|_stage1|_qlora|_fsdp2)?\.yaml$")
TABLE2_LLMS = ("Qwen2.5-3B", "Qwen3-4B", "Vicuna-7B", "LLaMA3-8B", "Qwen2.5-7B", "Qwen3-8B", "Vicuna-13B",
               "Qwen2.5-14B", "Qwen3-14B")
PAPER_DEFAULTS = {"stage": "hera", "hera_heads": "auto", "hera_k": 10, "hera_lambda": 0.01,
                  "hera_teacher": "facebook/dinov2-large", "hera_select_num_heads": 5,
                  "hera_select_strategy": "worst", "hera_select_mode": "text", "hera_select_samples": 1000,
                  "hera_teacher_feature": "cls", "hera_temperature": 0.07}
# Keys whose meaning is plain from name and value; every other key line needs a comment (inline or just above).
SELF_EXPLANATORY = {"do_train", "trust_remote_code", "finetuning_type", "lora_rank", "lora_alpha",
                    "preprocessing_num_workers", "dataloader_num_workers", "output_dir", "logging_steps", "save_steps",
                    "overwrite_output_dir", "report_to", "learning_rate", "num_train_epochs", "lr_scheduler_type",
                    "bf16"}
# Keys whose value is a file or folder that must exist, relative to the repository root.
PATH_KEYS = ("deepspeed", "dataset_dir", "media_dir", "tokenized_path", "adapter_name_or_path", "ref_model",
             "reward_model", "mask_history_file")

# model family of the tiny fixtures -> (recipe trained 2 steps, transformers text model_type of the real MLLM).
# One recipe per model_type, covering a LoRA, a full (ZeRO-3, run here without DeepSpeed) and the stage-1 recipe.
TRAINED = {
    "qwen2_5_vl": ("qwen2_5_3b_hera.yaml", "qwen2_5_vl_text"),
    "qwen3_vl": ("qwen3_8b_hera_full.yaml", "qwen3_vl_text"),
    "llava": ("vicuna_7b_hera_stage1.yaml", "llama"),
    "llava_next": ("llama3_8b_hera.yaml", "llama"),
    "internvl": ("qwen2_5_14b_hera.yaml", "qwen2"),  # InternVL3-14B: Qwen2.5-14B
    "internvl_qwen3": ("qwen3_14b_hera_full.yaml", "qwen3"),  # InternVL3.5-14B: Qwen3-14B
}
TRAIN_STEPS = 2


def _load_memory_module() -> Any:
    spec = importlib.util.spec_from_file_location("hera_recipes_memory", RECIPES / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


MEMORY = _load_memory_module()
BACKBONES = {b.stem: b for b in (*MEMORY.BACKBONES, *MEMORY.FAMILIES_2026, *MEMORY.LARGE)}  # Table 2's, 2026's, 72B
QUEUED = {MEMORY.QLORA}  # per-device batch under hera_k + 1: HeRA's feature queue (hera_queue_size: auto) extends it
GATHERED = dict.fromkeys((MEMORY.FSDP2, MEMORY.FSDP2_72B), MEMORY.FSDP2_GPUS)  # batch x GPUs (hera_gather): the set


def _recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((RECIPES / name).read_text(encoding="utf-8"))


def _backbone(name: str) -> Any:
    return BACKBONES[NAME.match(name).group("stem")]


# ---------------------------------------------------------------------------------------------- parse


@pytest.mark.parametrize("name", RECIPE_FILES)
def test_recipe_parses_with_llamafactory_and_the_plugin(name: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory's own reader (OmegaConf, as `llamafactory-cli train FILE key=value`) and parser.

    Deviations from a GPU run, each forced by this machine: `deepspeed` is dropped (DeepSpeed is not installed
    here; the config file itself is checked by the lint), `use_cpu=true` (there is no GPU and transformers
    refuses bf16 without one unless told to use the CPU), `output_dir` goes to a temporary folder. The
    plugin's model-dependent checks (heads against the model's config, the teacher's config) need the model
    hub and are not run; they are exercised on tiny models by the training test below.
    """
    from llamafactory.hparams import get_train_args, read_args

    from llamafactory_hera.hera.config import parse_hera_arguments
    from llamafactory_hera_patches.recipe.arguments import split_args

    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", str(RECIPES / name), f"output_dir={tmp_path / 'out'}"])
    raw = read_args()
    host, hera_raw, is_hera = split_args(raw)
    assert is_hera and host["stage"] == "sft"
    hera = parse_hera_arguments(hera_raw)
    assert hera.auto_heads and hera.hera_k == 10 and hera.hera_lambda == 0.01
    host.pop("deepspeed", None)
    host["use_cpu"] = True
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(host)
    recipe, backbone = _recipe(name), _backbone(name)
    assert model_args.model_name_or_path == backbone.model_id
    assert data_args.template == backbone.template and data_args.cutoff_len == recipe["cutoff_len"]
    assert finetuning_args.stage == "sft" and finetuning_args.finetuning_type == recipe["finetuning_type"]
    contrastive = training_args.per_device_train_batch_size * GATHERED.get(name, 1)
    assert training_args.bf16 and (contrastive >= hera.hera_k + 1 or name in QUEUED)
    assert not model_args.disable_gradient_checkpointing
    if NAME.match(name).group("variant") == "_qlora":  # as LLaMA-Factory reads it: bitsandbytes nf4, double quant
        assert model_args.quantization_bit == 4 and model_args.quantization_method == "bnb"
        assert model_args.quantization_type == "nf4" and model_args.double_quantization


# ---------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def families(assets: TinyAssets) -> dict[str, tuple[Path, str]]:
    """Tiny model folder and template of every family: the session's three plus LLaVA-NeXT and both InternVLs."""
    extra = build_extra_families(REPO / ".hera_assets" / "extra_families", seed=0)
    return {name: (a.models[name], a.templates[name]) for a in (assets, extra) for name in a.models}


def _training_recipe(name: str, model: Path, assets: TinyAssets, out: Path) -> dict[str, Any]:
    """The recipe with only what a CPU test must change (and nothing the HeRA method depends on)."""
    recipe = _recipe(name)
    recipe.pop("deepspeed", None)  # DeepSpeed is not installed here (and there is one CPU process)
    recipe.update({
        "model_name_or_path": str(model), "dataset": "hera_demo", "dataset_dir": str(assets.dataset_dir),
        "hera_teacher": str(assets.teacher),  # tiny DINOv2 instead of facebook/dinov2-large (no hub)
        "cutoff_len": 256, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
        "max_steps": TRAIN_STEPS, "logging_steps": 1, "output_dir": str(out),
        "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
        "hera_select_samples": 24, "hera_k": 5,  # 32 tiny images; batches of 8
        "bf16": False,  # CPU
    })
    return recipe


@pytest.fixture(scope="module")
def training_runs(families: dict[str, tuple[Path, str]], assets: TinyAssets,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any, dict[str, Any]]]:
    """Train every entry of TRAINED once (in this process, one after another: run_exp's state is per process)."""
    root = tmp_path_factory.mktemp("recipes")
    results = {}
    for family, (name, _) in TRAINED.items():
        tmp = root / family
        recipe = _training_recipe(name, families[family][0], assets, tmp / "out")
        env = {"LLAMAFACTORY_HERA_CACHE": str(tmp / "selection_cache")}
        results[family] = tmp / "out", run_train(recipe, tmp, check=False, env=env), recipe
    return results


@pytest.mark.parametrize("name", EXTRA_MODEL_NAMES)
def test_extra_tiny_families_have_heads_and_image_tokens(name: str, families: dict, assets: TinyAssets,
                                                         tmp_path: Path) -> None:
    """The fixtures added for these recipes (LLaVA-NeXT, InternVL x2): o_proj per layer, image tokens, determinism."""
    import hashlib

    import torch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import AutoModelForImageTextToText

    spec, path = EXTRA_FAMILIES[name], families[name][0]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    layers = model.get_decoder().layers
    assert len(layers) == spec.num_layers
    assert all(layer.self_attn.o_proj.in_features == spec.num_heads * spec.head_dim for layer in layers)

    module = load_tokenizer(ModelArguments(model_name_or_path=str(path)))
    tokenizer, processor = module["tokenizer"], module["processor"]
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=spec.template))
    sample = json.loads((assets.dataset_dir / "hera_demo.json").read_text())[0]
    images = [str(assets.dataset_dir / p) for p in sample["images"]]
    messages = template.mm_plugin.process_messages(sample["messages"], images, [], [], processor)
    prompt_ids, answer_ids = template.encode_oneturn(tokenizer, messages)
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    assert prompt_ids.count(image_id) == spec.image_tokens_per_image
    assert tokenizer.eos_token_id in answer_ids[-2:] and len(tokenizer) == model.config.get_text_config().vocab_size
    inputs = template.mm_plugin.get_mm_inputs(images, [], [], [1], [0], [0], [prompt_ids], processor)
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits
    assert torch.isfinite(logits).all()

    # deterministic: a build of its own gives the same weights and tokenizer from the same seed as the fixture's build
    # (build_extra_families calls build_extra_model too)
    out = build_extra_model(name, tmp_path / "again", seed=0)
    digests = [{f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
                for f in ("model.safetensors", "tokenizer.json")} for folder in (out, path)]
    assert digests[0] == digests[1]


def test_every_recipe_model_type_has_a_tiny_training_run(families: dict[str, tuple[Path, str]]) -> None:
    used: set[tuple[str, str]] = set()
    for family, (name, text_type) in TRAINED.items():
        config = json.loads((families[family][0] / "config.json").read_text())
        backbone = _backbone(name)
        assert config["model_type"] == backbone.model_type, family  # same architecture class as the real MLLM
        assert config["text_config"]["model_type"] == text_type, family
        assert families[family][1] == backbone.template, family  # the recipe's template fits the tiny model
        used.add((backbone.model_type, text_type))
    text_types = {"Qwen2.5-14B": "qwen2", "Qwen3-14B": "qwen3"}  # InternVL: one model_type, two text models
    for b in MEMORY.BACKBONES:
        assert b.model_type in {model_type for model_type, _ in used}, b.llm
        if b.model_type == "internvl":
            assert (b.model_type, text_types[b.llm]) in used, b.llm
    variants = {NAME.match(name).group("variant") for name, _ in TRAINED.values()}
    assert variants == {None, "_full", "_stage1"}  # LoRA, full and stage-1 each train at least once


@pytest.mark.parametrize("family", list(TRAINED))
def test_recipe_trains_on_a_tiny_model_of_its_family(family: str, training_runs: dict) -> None:
    out, proc, recipe = training_runs[family]
    assert proc.returncode == 0, f"{TRAINED[family][0]} on tiny {family}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [line for line in read_trainer_log(out) if "loss" in line]
    assert [line["current_steps"] for line in lines] == list(range(1, TRAIN_STEPS + 1))
    assert all("hera_loss" in line and line["hera_image_samples"] == 8 for line in lines)
    selection = json.loads((out / "hera_selection.json").read_text())  # hera_heads: auto ran
    assert len(selection["selected"]) == recipe["hera_select_num_heads"]
    record = json.loads((out / "hera_run.json").read_text())
    assert record["hera_heads"] == selection["selected"]
    for key, value in recipe.items():
        if key.startswith("hera_") and key != "hera_heads":
            assert record[key] == value, key
    assert record["host"]["template"] == recipe["template"]
    weights = "adapter_model.safetensors" if recipe["finetuning_type"] == "lora" else "model.safetensors"
    assert (out / weights).is_file()


def test_stage1_recipe_trains_the_projector_only(training_runs: dict, families: dict) -> None:
    from safetensors.torch import load_file

    out, proc, recipe = training_runs["llava"]
    assert proc.returncode == 0 and recipe["freeze_language_model"] and not recipe["freeze_multi_modal_projector"]
    before = load_file(families["llava"][0] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = {key for key in before if not before[key].equal(after[key].to(before[key].dtype))}
    assert changed and all("multi_modal_projector" in key for key in changed), sorted(changed)


# ---------------------------------------------------------------------------------------------- lint


def test_names_cover_table2_with_lora_and_full_plus_one_stage1_example() -> None:
    """Table 2's LLMs in LoRA and full, one stage-1 example, the QLoRA and FSDP2 twins of Qwen3-8B's LoRA recipe and
    one LoRA recipe for each 2026 family, the 72B model's FSDP2 recipe."""
    assert [b.llm for b in MEMORY.BACKBONES] == list(TABLE2_LLMS)
    for name in RECIPE_FILES:
        match = NAME.match(name)
        assert match and match.group("stem") in BACKBONES, f"{name}: not <llm>_<size>_hera(_full).yaml"
    expected = {f"{b.stem}_hera{v}.yaml" for b in MEMORY.BACKBONES for v in ("", "_full")}
    hardware = {MEMORY.QLORA, MEMORY.FSDP2, MEMORY.FSDP2_72B} | {f"{b.stem}_hera.yaml" for b in MEMORY.FAMILIES_2026}
    assert {MEMORY.QLORA, MEMORY.FSDP2} == {"qwen3_8b_hera_qlora.yaml", "qwen3_8b_hera_fsdp2.yaml"}
    stage1 = [name for name in RECIPE_FILES if name.endswith("_stage1.yaml")]
    assert set(RECIPE_FILES) == expected | hardware | set(stage1) and len(stage1) == 1


@pytest.mark.parametrize("name", RECIPE_FILES)
def test_recipe_keys_paths_and_comments(name: str) -> None:
    from llamafactory.data.parser import get_dataset_list

    recipe, backbone, variant = _recipe(name), _backbone(name), NAME.match(name).group("variant")
    for key, value in PAPER_DEFAULTS.items():
        assert recipe.get(key) == value, f"{name}: {key} should be {value!r}"
    assert recipe["model_name_or_path"] == backbone.model_id and recipe["template"] == backbone.template
    contrastive = recipe["per_device_train_batch_size"] * GATHERED.get(name, 1)  # per device, or gathered
    if name in QUEUED:  # a smaller micro-batch: HeRA's feature queue holds the rest of the contrastive set
        assert contrastive < recipe["hera_k"] + 1 and recipe["hera_queue_size"] == "auto"
    else:
        assert contrastive >= recipe["hera_k"] + 1 and "hera_queue_size" not in recipe
    assert recipe.get("disable_gradient_checkpointing") is False and "gradient_checkpointing" not in recipe
    assert not any(key.startswith("fsdp") for key in recipe)  # FSDP comes from the accelerate config alone
    if variant == "_qlora":  # LLaMA-Factory's examples/train_qlora: bitsandbytes 4-bit nf4, double quantization
        assert (recipe["quantization_bit"], recipe["quantization_method"], recipe["quantization_type"],
                recipe["double_quantization"]) == (4, "bnb", "nf4", True)
    else:
        assert not any(key.startswith("quantization") for key in recipe)
    if variant in (None, "_qlora", "_fsdp2"):
        assert recipe["finetuning_type"] == "lora" and "deepspeed" not in recipe
    elif variant == "_full":
        assert recipe["finetuning_type"] == "full" and recipe["deepspeed"] == "recipes/deepspeed/ds_z3_config.json"
        assert recipe["freeze_multi_modal_projector"] is False and recipe["freeze_language_model"] is False
    else:  # stage 1: language model frozen, projector trained
        assert recipe["finetuning_type"] == "full" and recipe["freeze_language_model"] is True
        assert recipe["freeze_multi_modal_projector"] is False
        assert recipe["hera_pooling"] == "assistant" and not recipe.get("train_on_prompt")  # pools the captions

    # Paths are relative to the repository root (where `llamafactory-cli train recipes/<name>` runs).
    for key in PATH_KEYS:
        if recipe.get(key) is not None:
            assert not Path(recipe[key]).is_absolute() and (REPO / recipe[key]).exists(), f"{name}: {key}"
    for key, value in recipe.items():
        if isinstance(value, str) and (value.startswith("recipes/") or value.endswith((".json", ".yaml"))):
            assert (REPO / value).exists(), f"{name}: {key}: {value} does not exist"
    datasets = [d.strip() for d in str(recipe["dataset"]).split(",")]
    for attr in get_dataset_list(datasets, str(REPO / recipe["dataset_dir"])):  # LLaMA-Factory's own lookup
        assert attr.formatting == "sharegpt" and attr.images == "images"
        if attr.load_from == "file":
            assert (REPO / recipe["dataset_dir"] / attr.dataset_name).exists(), f"{name}: {attr.dataset_name}"

    text = (RECIPES / name).read_text(encoding="utf-8")
    _check_comments(name, text)
    assert text.startswith("# HeRA, the paper's secondary setting (fine-tuning an existing MLLM), ")  # not Table 2's
    wrap = "--fsdp_transformer_layer_cls_to_wrap Qwen2_5_VLDecoderLayer,Qwen2_5_VLVisionBlock " \
        if backbone in MEMORY.LARGE else ""  # the config names Qwen3-VL's classes
    run = (f"accelerate launch --config_file recipes/{MEMORY.FSDP2_CONFIG} {wrap}-m llamafactory.launcher "
           f"recipes/{name}" if variant == "_fsdp2" else f"llamafactory-cli train recipes/{name}")
    assert run in text and "stage=sft" in text  # run + baseline twin
    if backbone in (*MEMORY.FAMILIES_2026, *MEMORY.LARGE):
        assert f"# {backbone.llm} is not in the paper: `auto` selects its heads the paper's way" in text
    elif backbone.paper_heads:
        heads = f"[{', '.join(backbone.paper_heads)}]"
        assert f"Paper, Table 5: the 5 least aligned heads of the text-only {backbone.llm} are {heads}" in text
    else:
        assert f"the heads selected for {backbone.llm} are not reproduced in our sources" in text


def _check_comments(name: str, text: str) -> None:
    lines = text.splitlines()
    assert lines[0].startswith("# HeRA"), f"{name}: starts with a header comment"
    previous = ""
    for line in lines:
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*):", line)
        if match and match.group(1) not in SELF_EXPLANATORY:
            assert "#" in line or previous.lstrip().startswith("#"), f"{name}: `{match.group(1)}` needs a comment"
        previous = line


def test_paper_heads_fit_the_real_models() -> None:
    from llamafactory_hera.heads.geometry import parse_head

    for b in MEMORY.BACKBONES:
        for head in b.paper_heads:
            ref = parse_head(head)
            assert ref.layer < b.layers and ref.head < b.heads, f"{b.llm}: {head}"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_leave_sizes_to_the_trainer(stage: int) -> None:
    config = json.loads((RECIPES / "deepspeed" / f"ds_z{stage}_config.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key  # the HF Trainer fills them from the recipe
    assert config["bf16"]["enabled"] == "auto"
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert config["zero_optimization"]["stage3_max_live_parameters"] == MEMORY.ZERO3_LIVE_PARAMS


def test_docs_recipes_table_matches_the_estimates() -> None:
    hera_doc = (REPO / "docs" / "hera.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", hera_doc, flags=re.M)
    assert headings.index("Recipes") == headings.index("Quickstart: a real GPU run") + 1
    section = re.search(r"^## Recipes$(.*?)(?=^## |\Z)", hera_doc, flags=re.M | re.S).group(1)
    for row in MEMORY.table_rows():
        assert row in section, f"docs/hera.md table row differs from `python recipes/memory.py`:\n{row}"
    assert MEMORY.stage1_row() in section
    for row in MEMORY.hardware_rows():  # QLoRA, FSDP2 and the 2026 families
        assert row in section, f"docs/hera.md table row differs from `python recipes/memory.py`:\n{row}"
    for name in RECIPE_FILES:
        assert name in section, name
    assert "stage=sft" in section and "ds_z2_config.json" in section and "ZeRO-3" in section
