"""``llamafactory-hera compose``: a LLaVA model from tiny parts (SigLIP + Qwen3, CLIP + Llama in Vicuna's format), its
processor and template, loading in plain transformers without the plugin, a stock SFT step, export and chat, and each
refusal."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_runs import run_python

from conftest import offline_env, run_train
from llamafactory_hera.cli import main as hera_cli
from llamafactory_hera.fixtures.dataset import DATASET_NAME, build_dataset
from llamafactory_hera.llava.compose_build import RECORD
from llamafactory_hera.llava.compose_plan import detect_family, vision_geometry
from llamafactory_hera_testing.parts import build_part

PAIRS = {"qwen3_siglip": ("qwen3", "siglip"), "llama_clip": ("llama", "clip"), "qwen2_clip": ("qwen2", "clip")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny parts, each in a folder named as its kind, and one composed model per pair (``composed/PAIR``, with
    what ``compose`` printed in ``PAIR.out``)."""
    root = tmp_path_factory.mktemp("compose")
    for kind in ("qwen3", "qwen2", "llama", "llama3", "siglip", "clip"):
        build_part(kind, root / kind)
    for pair, (llm, vision) in PAIRS.items():
        out = root / "composed" / pair
        code, printed = _compose(["--llm", str(root / llm), "--vision", str(root / vision), "--output", str(out)])
        assert code == 0, printed
        (root / f"{pair}.out").write_text(printed)
    return root


def _compose(argv: list[str]) -> tuple[int, str]:
    """``llamafactory-hera compose ARGV`` in this process: exit code and what it printed (stdout and stderr)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = hera_cli(["compose", *argv])
    return code, out.getvalue()


def _record(parts: Path, pair: str) -> dict[str, Any]:
    return json.loads((parts / "composed" / pair / RECORD).read_text())


@pytest.mark.parametrize(("pair", "template", "strategy", "image_row"), [
    ("qwen3_siglip", "llava_qwen3", "full", "new"), ("llama_clip", "llava_vicuna", "default", "kept"),
    ("qwen2_clip", "llava_qwen2_5", "default", "spare")])
def test_compose_writes_llava_of_the_parts(parts: Path, pair: str, template: str, strategy: str,
                                           image_row: str) -> None:
    llm_kind, vision_kind = PAIRS[pair]
    folder = parts / "composed" / pair
    config = json.loads((folder / "config.json").read_text())
    record = _record(parts, pair)
    assert (parts / f"{pair}.out").read_text().splitlines()[-1] == f"template: {template}"
    assert record["template"] == template and record["seed"] == 42
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, strategy)
    assert config["projector_hidden_act"] == "gelu" and config["multimodal_projector_bias"] is True
    assert config["image_seq_length"] == record["image_seq_length"] == 4  # 28 px / 14 px: 2x2 patches, no [CLS] kept
    model, llm = _loaded(folder), _loaded(parts / llm_kind)
    token, rows = config["image_token_index"], llm.get_input_embeddings().weight.shape[0]
    pieces = [(model.model.language_model, llm.model), (model.lm_head, llm.lm_head),
              (model.model.vision_tower, _loaded(parts / vision_kind).vision_model)]
    for mine, theirs in pieces:  # the LLM and the vision tower, unchanged (the image token's row aside)
        theirs = {k: v for k, v in theirs.state_dict().items() if not k.startswith("head.")}  # SigLIP's pooling head
        assert mine.state_dict().keys() == theirs.keys()
        for key, weight in mine.state_dict().items():
            weight = weight[: len(theirs[key])]
            if key in ("embed_tokens.weight", "weight"):  # the input and output embeddings
                assert torch.equal(weight[:token], theirs[key][:token])
                assert torch.equal(weight[token + 1:], theirs[key][token + 1:])
            else:
                assert torch.equal(weight, theirs[key]), key
    projector = {name for name, _ in model.model.multi_modal_projector.named_parameters()}
    assert projector == {f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    embeddings = model.get_input_embeddings().weight
    assert (model.lm_head.weight is embeddings) == bool(llm.config.tie_word_embeddings)
    if image_row == "kept":
        assert "already in the LLM's tokenizer" in record["added_token"] and token < rows
        return
    # a new row (Qwen3, untied), or the first spare row (Qwen2, tied): the mean of the tokenizer's rows
    assert token == 512 and (token == rows) == (image_row == "new")
    assert f"<image> added as token 512: {'a new row' if image_row == 'new' else 'row 512 of 520'}" in record[
        "added_token"]
    for matrix in {id(m): m for m in (embeddings, model.lm_head.weight)}.values():
        torch.testing.assert_close(matrix[token], matrix[:token].mean(0))


def _loaded(folder: Path) -> Any:
    """The model in ``folder``, as its config's architecture."""
    import transformers

    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(folder).eval()


def test_compose_processor_expands_image_to_the_encoder_length(parts: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    for pair in PAIRS:
        processor = AutoProcessor.from_pretrained(parts / "composed" / pair)
        inputs = processor(images=Image.new("RGB", (40, 48)), text="look <image> here", return_tensors="pt")
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        assert int((inputs["input_ids"] == image_id).sum()) == 4, pair
        assert tuple(inputs["pixel_values"].shape) == (1, 3, 28, 28)


# Run with `python -E -S`: no PYTHONPATH, site-packages added without its .pth files (no start-up hook), and neither
# the plugin nor LLaMA-Factory importable. Prints the logits' shape for an image+text input, whether a text-only
# input gives the LLM's own logits (over the LLM's tokens), and the checkpoint's keys the model did not take as is.
_PLAIN = """
import sys
class NoPlugin:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("llamafactory_hera", "llamafactory_hera_patches", "llamafactory"):
            raise ImportError(name + " is not importable here")
sys.meta_path.insert(0, NoPlugin())
sys.path.append(sys.argv[1])
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
for composed, llm in zip(sys.argv[2::2], sys.argv[3::2]):
    model, info = AutoModelForImageTextToText.from_pretrained(composed, output_loading_info=True)
    model.eval()
    processor = AutoProcessor.from_pretrained(composed)
    inputs = processor(images=Image.new("RGB", (48, 40), (200, 30, 90)), text="a <image> of", return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(llm)
    text, known = tokenizer("a red square", return_tensors="pt"), len(tokenizer)  # known: the LLM's tokens
    with torch.no_grad():
        logits = model(**inputs).logits
        own = AutoModelForCausalLM.from_pretrained(llm).eval()(**text).logits
        same = torch.equal(model(**text).logits[..., :known], own[..., :known])
    off = [key for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") for key in info[kind]]
    print(type(model).__name__, tuple(logits.shape), bool(torch.isfinite(logits).all()), same, off)
print("plugin imported:", any(m.startswith("llamafactory") for m in sys.modules))
"""


def test_compose_loads_in_plain_transformers_without_the_plugin(parts: Path, tmp_path: Path) -> None:
    folders = [str(p) for pair, (llm, _) in PAIRS.items() for p in (parts / "composed" / pair, parts / llm)]
    proc = subprocess.run([sys.executable, "-E", "-S", "-c", _PLAIN, sysconfig.get_paths()["purelib"], *folders],
                          env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[-4:] == ["LlavaForConditionalGeneration (1, 7, 513) True True []",
                          "LlavaForConditionalGeneration (1, 8, 512) True True []",
                          "LlavaForConditionalGeneration (1, 7, 520) True True []",
                          "plugin imported: False"], proc.stdout


def test_compose_detects_the_family_from_config_and_tokenizer(parts: Path) -> None:
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(parts / "llama")
    assert detect_family("x", {"model_type": "qwen2"}, None)[0] == "qwen2.5"
    assert detect_family("x", {"model_type": "qwen3"}, None)[0] == "qwen3"
    assert detect_family("x", {"model_type": "llama"}, llama)[0] == "vicuna"
    assert detect_family("x", {"model_type": "llama"}, AutoTokenizer.from_pretrained(parts / "llama3"))[0] == "llama3"
    llama.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert detect_family("x", {"model_type": "llama"}, llama)[0] == "llama2"


def test_compose_reads_the_encoder_geometry_with_its_defaults(tmp_path: Path) -> None:
    """A config.json leaves out default values (SigLIP2-base-patch16-512 has no patch_size): transformers' fill them."""
    config = {"model_type": "siglip", "vision_config": {"image_size": 64, "model_type": "siglip_vision_model"}}
    geometry = vision_geometry(str(_config_folder(tmp_path / "s", config)), config)
    assert (geometry.patch_size, geometry.image_seq_length, geometry.select_strategy) == (16, 16, "full")
    config = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
    geometry = vision_geometry(str(_config_folder(tmp_path / "c", config)), config)
    assert (geometry.image_seq_length, geometry.select_strategy, geometry.feature_layer) == (576, "default", -2)


def test_compose_template_is_the_family_format_with_llava_plugin(parts: Path) -> None:
    from llamafactory.data.mm_plugin import LlavaPlugin
    from llamafactory.data.template import TEMPLATES
    from PIL import Image
    from transformers import AutoProcessor

    for name, base in {"llava_qwen2_5": "qwen", "llava_qwen3": "qwen3_nothink", "llava_llama2": "llama2",
                       "llava_llama3": "llama3"}.items():
        template, family = TEMPLATES[name], TEMPLATES[base]
        assert isinstance(template.mm_plugin, LlavaPlugin) and template.mm_plugin.image_token == "<image>"
        assert (template.format_user, template.stop_words, type(template)) == (
            family.format_user, family.stop_words, type(family))
    processor = AutoProcessor.from_pretrained(parts / "composed" / "qwen3_siglip")
    messages = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A square."}]
    # Vicuna: LLaMA-Factory's vicuna format, each row started with the BOS LLaVA-1.5 writes (its llava/vicuna do not)
    tokenizer = AutoProcessor.from_pretrained(parts / "composed" / "llama_clip").tokenizer
    prompt, answer = TEMPLATES["llava_vicuna"].encode_oneturn(tokenizer, messages)
    vicuna_prompt, vicuna_answer = TEMPLATES["vicuna"].encode_oneturn(tokenizer, messages)
    assert prompt == [tokenizer.bos_token_id, *vicuna_prompt] and answer == vicuna_answer
    assert tokenizer.decode(prompt).startswith(f"{tokenizer.bos_token}A chat between")
    expanded = TEMPLATES["llava_qwen3"].mm_plugin.process_messages(messages, [Image.new("RGB", (48, 48))], [], [],
                                                                    processor)
    assert expanded[0]["content"] == "<image>" * 4 + "What is it?"


def test_compose_trains_with_stock_sft(parts: Path, tmp_path: Path) -> None:
    """LLaVA-1.5's stage 1 with the stock SFT stage: the projector alone learns."""
    build_dataset(tmp_path / "data", seed=0, num_images=4)
    recipe = {"model_name_or_path": str(parts / "composed" / "qwen3_siglip"), "template": "llava_qwen3",
              "stage": "sft", "do_train": True, "finetuning_type": "full", "freeze_language_model": True,
              "freeze_multi_modal_projector": False, "dataset_dir": str(tmp_path / "data"), "dataset": DATASET_NAME,
              "cutoff_len": 256, "max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
              "output_dir": str(tmp_path / "run"), "report_to": "none", "plot_loss": False, "overwrite_cache": True}
    proc = run_train(recipe, tmp_path)
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 1, proc.stdout[-2000:]
    before = _loaded(parts / "composed" / "qwen3_siglip").state_dict()
    changed = {name for name, weight in _loaded(tmp_path / "run").state_dict().items()
               if not torch.equal(weight, before[name])}
    assert changed == {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


# What `llamafactory-cli export` and `llamafactory-cli chat` run, in one process (one import of LLaMA-Factory): export
# the composed model with its template, then answer an image question with the exported folder.
_EXPORT_AND_CHAT = """
import json, sys
from llamafactory.chat import ChatModel
from llamafactory.train.tuner import export_model
args, exported = json.loads(sys.argv[1]), sys.argv[2]
export_model({**args, "export_dir": exported, "export_device": "cpu"})
reply = ChatModel({**args, "model_name_or_path": exported, "max_new_tokens": 4}).chat(
    [{"role": "user", "content": "<image>What is it?"}], images=[sys.argv[3]])
print("REPLIES", len(reply), reply[0].prompt_length)
"""


def test_compose_exports_and_chats_with_stock_llamafactory(parts: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (48, 48), (10, 200, 30)).save(tmp_path / "image.png")
    args = {"model_name_or_path": str(parts / "composed" / "qwen3_siglip"), "template": "llava_qwen3"}
    (tmp_path / "export_and_chat.py").write_text(_EXPORT_AND_CHAT, encoding="utf-8")  # forked from the warm process
    proc = run_python(tmp_path / "export_and_chat.py", [json.dumps(args), str(tmp_path / "exported"),
                                                        str(tmp_path / "image.png")],
                      cwd=tmp_path, env=offline_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    replies, prompt_length = proc.stdout.split("REPLIES")[-1].split()
    assert replies == "1" and int(prompt_length) > 4  # the four image tokens and the question's
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["model_type"] == "llava"
    assert (tmp_path / "exported" / "processor_config.json").exists()


def _config_folder(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", ["output", "under_a_file", "multimodal", "not_encoder", "naflex", "unknown_family",
                                  "bad_family"])
def test_compose_refuses_before_loading(parts: Path, tmp_path: Path, case: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    from llamafactory_hera.llava import compose_build as build

    monkeypatch.setattr(build, "compose", lambda *_: pytest.fail("compose loaded weights before refusing"))

    llm, vision, output, extra = parts / "qwen3", parts / "siglip", tmp_path / "out", []
    if case == "output":
        output.mkdir()
        (output / "keep.txt").write_text("mine")
        expected = f"--output {output}: it exists and is not an empty folder; compose never overwrites"
    elif case == "under_a_file":  # ended in a bare "[Errno 17] File exists" once the weights had loaded
        (tmp_path / "a_file").write_text("x")
        output = tmp_path / "a_file" / "out"
        expected = (f"--output: {output} cannot be created: {tmp_path / 'a_file'} is a file, not a folder. "
                    "Choose an --output whose parent folders are folders.")
    elif case == "multimodal":
        llm = parts / "composed" / "llama_clip"
        expected = f"--llm {llm}: it is already a multimodal model (model type 'llava', its config has vision_config"
    elif case == "not_encoder":
        vision = parts / "qwen3"
        expected = f"--vision {vision}: model type 'qwen3' is not an image encoder compose knows; give a CLIP or SigLIP"
    elif case == "naflex":
        vision = _config_folder(tmp_path / "naflex", {"model_type": "siglip2"})
        expected = (f"--vision {vision}: model type 'siglip2' is not an image encoder compose knows (SigLIP2's NaFlex "
                    "models have variable resolution: take a fixed-resolution one")
    elif case == "unknown_family":
        llm = _config_folder(tmp_path / "mistral", {"model_type": "mistral"})
        AutoTokenizer.from_pretrained(parts / "llama").save_pretrained(llm)
        expected = (f"--llm {llm}: model type 'mistral' is of no LLM family compose has a template for; it knows "
                    "qwen2.5, qwen3, vicuna, llama2, llama3")
    else:
        extra = ["--family", "gemma"]
        expected = "--family gemma: no template for it; the families compose knows are qwen2.5, qwen3, vicuna, llama2"
    code, printed = _compose(["--llm", str(llm), "--vision", str(vision), "--output", str(output), *extra])
    assert code == 2 and f"llamafactory-hera: error: {expected}" in printed, printed
    assert case == "output" or not output.exists()
    assert printed.count("\n") == 1, printed  # the error alone
    assert not list(tmp_path.glob(".out.composing-*"))
