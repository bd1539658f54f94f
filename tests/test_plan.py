"""``llamafactory-hera plan``: its memory categories against hand arithmetic, the CPU attention kernels' FLOPs against
the formula, the reduced-and-scaled count against the full depth on a tiny Qwen3-VL, a run that does not fit told what
would, and the command's error lines. In process, on tiny configs built here (no weights, no network)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import yaml
from llamafactory.data import get_template_and_fix_tokenizer
from llamafactory.model import load_tokenizer
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from llamafactory_hera.cli import main
from llamafactory_hera.plan import cards, count, counter, estimate, lengths, methods, report, timing
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.data.templates import whole_row
from llamafactory_hera_patches.tools.model_data import load_aligned_rows, parse_recipe, sampled_rows

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                            "mrope_interleaved": True}}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64, "patch_size": 16,
          "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 16,
          "deepstack_visual_indexes": [1]}


def tiny_config(layers: int = 3, depth: int = 3):
    return AutoConfig.for_model("qwen3_vl", text_config=dict(TEXT, num_hidden_layers=layers),
                                vision_config=dict(VISION, depth=depth))


def shape(**changes) -> count.Shape:
    return count.Shape(**{"batch": 2, "seq": 32, "max_pixels": 64 * 64, "lora_rank": 4, "lora_alpha": 8,
                          "quantized": False, "checkpointing": True, **changes})


# parameters 1000 (10 trained, 800 in linear layers, 100 embeddings, 50 per decoder layer); step: 7 + 3 bytes
COUNTS = {"params": 1000, "trainable": 10, "quantizable": 800, "embedding": 100, "layer": 50, "activations": 7,
          "temporaries": 3}


def setup(**changes) -> estimate.Setup:
    return estimate.Setup(**{"stage": "hera", "lora": True, "bits": None, "double_quant": True, "engine": "ddp",
                             "gpus": 1, "live_params": 1e9, "batch": 4, "accumulation": 2, "cutoff": 1024,
                             "liger": False, "checkpointing": True, "epochs": 1.0, "max_steps": -1, **changes})


@pytest.mark.parametrize(("changes", "parameters", "gradients", "optimizer", "gathered", "load"), [
    ({}, 2 * 990 + 4 * 10, 40, 80, 0, 2 * 990),  # frozen bf16, adapters fp32 + grads + 2 moments
    ({"bits": 4}, 800 * (0.5 + (1 + 4 / 256) / 64) + 2 * 190 + 40, 40, 80, 0, 2 * 990),  # nf4 + double quant
    ({"engine": "fsdp2", "gpus": 4}, 4 * 1000 / 4, 40 / 4, 80 / 4, 2 * (2 * 50 + 100), 4 * 1000 / 4 + 400),
    ({"engine": "zero3", "gpus": 4, "live_params": 300}, (2 * 990 + 6 * 10) / 4, 40 / 4, 80 / 4, 2 * 300,
     (2 * 990 + 60) / 4 + 600),
    ({"engine": "zero3", "gpus": 8, "lora": False, "live_params": 300}, None, None, None, 600, None),
    ({"engine": "zero2", "gpus": 2}, 2 * 1000 + 4 * 10 / 2, 2 * 10 / 2, 8 * 10 / 2, 0, 2 * 990),
])
def test_memory_categories_by_hand(changes, parameters, gradients, optimizer, gathered, load) -> None:
    counts = dict(COUNTS)
    if changes.get("lora") is False:  # a full fine-tune under ZeRO-3: 18 bytes per parameter over the ranks
        counts["trainable"] = 1000
        parts = estimate.memory(counts, setup(**changes))
        assert parts["parameters"] + parts["gradients"] + parts["optimizer"] == 18 * 1000 / 8
        return
    parts = estimate.memory(counts, setup(**changes))
    assert parts["parameters"] == pytest.approx(parameters)
    assert (parts["gradients"], parts["optimizer"], parts["gathered"]) == (gradients, optimizer, gathered)
    assert parts["step peak"] == pytest.approx(parameters + gradients + optimizer + gathered + 7 + 3)
    assert parts["load peak"] == pytest.approx(load)
    assert parts["needed"] == pytest.approx(max(parts["step peak"], load) + 2 * GIB)


def _checkpointed_stack(layers: int, flops_mode) -> tuple[int, int, int]:
    """(FLOPs, bytes alive at the forward's end, the backward's peak beyond them) of ``layers`` reentrant-checkpointed
    512-wide linear + GELU layers on 2 x 256 rows, counted by the StepCounter under ``flops_mode`` (None: no FLOP
    counter at all, the reference)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.checkpoint import checkpoint

    with FakeTensorMode():
        stack = torch.nn.ModuleList(torch.nn.Linear(512, 512) for _ in range(layers))
        hidden = torch.empty(2, 256, 512, requires_grad=True)
        steps = counter.StepCounter(exclude=list(stack.parameters()))
        mode = flops_mode() if flops_mode else None
        with mode or contextlib.nullcontext(), steps:
            for layer in stack:
                hidden = checkpoint(lambda x, layer=layer: F.gelu(layer(x)), hidden, use_reentrant=True)
            steps.mark()
            hidden.sum().backward()
    return (mode.get_total_flops() if mode else 0), steps.at_mark, steps.peak - steps.at_mark


def test_a_checkpointed_backwards_peak_is_counted_as_without_a_flop_counter() -> None:
    """plan counts memory and FLOPs in one pass. Under torch's own FlopCounterMode a checkpointed backward's peak grew
    with the depth (its module tracker hooks every recomputed layer's tensors until the backward ends): the FLOP
    counter plan uses (counter.StepFlops) leaves the peak as a count without any FLOP counter has it, at every depth,
    and counts the same FLOPs as torch's."""
    for layers in (2, 6):
        plain = _checkpointed_stack(layers, None)
        ours = _checkpointed_stack(layers, counter.StepFlops)
        torchs = _checkpointed_stack(layers, lambda: FlopCounterMode(display=False))
        assert ours[1:] == plain[1:], (layers, ours, plain)
        assert ours[0] == torchs[0] > 0
    assert _checkpointed_stack(6, None)[2] < 1.01 * _checkpointed_stack(2, None)[2]  # a layer at a time in backward


@pytest.mark.parametrize("keys", [16, 24])
def test_attention_flops_on_the_cpu_kernel_follow_the_formula(keys: int) -> None:
    """Forward 4 b h s_q s_k d; backward the scores recomputed and four products, 10 b h s_q s_k d (2.5 x the
    forward); causal or not (the full product, as torch counts its GPU kernels); torch alone scores the CPU kernel
    0."""
    b, h, s, d = 2, 3, 16, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    k, v = torch.randn(b, h, keys, d, requires_grad=True), torch.randn(b, h, keys, d, requires_grad=True)
    counter.count_attention()
    with FlopCounterMode(display=False) as flops:
        F.scaled_dot_product_attention(q, k, v, is_causal=keys == s).sum().backward()
    by_op = {str(op): n for op, n in flops.get_flop_counts()["Global"].items()}
    assert by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == 4 * b * h * s * keys * d
    assert by_op["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == 5 * 2 * b * h * s * keys * d


def test_scaled_count_equals_the_full_depth() -> None:
    """HeRA's step under gradient checkpointing on the tiny model counted with 2 decoder layers (its head layer, one
    more reentrant one) and once more with 3, scaled to 4 layers, equals its count at 4 layers: every figure. Three
    counts, the fewest that extrapolate past the layers counted; the vision tower stays at its one (DeepStack) block,
    whose increment the scaling adds the same way."""
    config = tiny_config(layers=4, depth=1)
    config.vision_config.deepstack_visual_indexes = [0]
    heads, layers = count.head_layers(["L1H0", "L1H3"], 2)
    hera = shape(hera={"hera_lambda": 0.01, "hera_k": 1, "heads": heads})
    scaled = count.scaled(config, {"hera": hera}, layers)["hera"]
    full = count.count(config, hera)
    assert {key: scaled[key] for key in count.FIGURES} == {key: full[key] for key in count.FIGURES}
    assert scaled["trainable"] == 4 * 4 * 1024  # r x layers x the sum of in + out of q k v o gate up down
    assert scaled["attention"] > 0


def test_a_run_that_does_not_fit_is_told_what_would() -> None:
    """An 8B-sized LoRA step (16.4 GiB of weights, 14 of activations, 18.5 of temporaries) on a 24 GB card: each
    change with its figure; Liger's and 4 bits' from their own counts, more GPUs under FSDP2."""
    big = {"params": 8.79e9, "trainable": 2.2e7, "quantizable": 7.5e9, "embedding": 1.25e9, "layer": 2e8,
           "activations": 14 * GIB, "temporaries": 18.5 * GIB}
    counts = {"hera": big, "hera+liger": {**big, "activations": 5 * GIB, "temporaries": 10.8 * GIB},
              "hera+qlora": {**big, "temporaries": 19 * GIB}}
    card = cards.CARDS["RTX-4090"]
    plain = estimate.memory(big, setup(batch=16))["needed"]
    assert plain > card.memory_gib * GIB
    fixes = dict(estimate.fixes(counts, setup(batch=16), card, "hera"))
    weights = 2 * (8.79e9 - 2.2e7) + 4 * 2.2e7
    assert fixes["enable_liger_kernel=true",] == pytest.approx(weights + 12 * 2.2e7 + 15.8 * GIB + 2 * GIB)
    assert fixes["per_device_train_batch_size=8 gradient_accumulation_steps=4",] == pytest.approx(
        plain - 16.25 * GIB)
    assert ("quantization_bit=4",) in fixes
    assert not any("--gpus" in change[0] for change in fixes if len(change) == 1)  # 32.5 GiB of activations and
    # temporaries on every GPU: no number of GPUs alone
    assert not any(card.holds(need) for change, need in fixes.items() if len(change) == 1)
    # two changes: the shipped QLoRA recipe's own (4 bits, a micro-batch of 4), by hand: nf4 linear weights, the
    # rest bf16, fp32 adapters + gradients + moments, a quarter of the activations and temporaries, the reserve
    nf4 = 7.5e9 * (0.5 + (1 + 4 / 256) / 64) + 2 * (8.79e9 - 2.2e7 - 7.5e9) + 16 * 2.2e7
    pairs = [change for change in fixes if len(change) == 2]
    qlora = ("per_device_train_batch_size=4 gradient_accumulation_steps=8", "quantization_bit=4")
    assert fixes[qlora] == pytest.approx(max(nf4 + 19 / 4 * GIB + 14 / 4 * GIB, 2 * (8.79e9 - 2.2e7)) + 2 * GIB)
    assert pairs and all(card.holds(fixes[change]) for change in pairs)
    ranks = [sum(next(rank for rank, key in enumerate(("liger", "batch", "quantization", "--gpus", "cutoff"))
                      if key in part) for part in change) for change in pairs]
    assert ranks == sorted(ranks)  # cheapest first: Liger, micro-batch, 4 bits, GPUs, cutoff
    small = {"hera": {**big, "activations": GIB, "temporaries": GIB}}  # the weights decide: FSDP2 over 2 GPUs
    fsdp2 = ("--gpus 2 --accelerate-config recipes/accelerate/fsdp2_config.yaml",)
    assert dict(estimate.fixes(small, setup(), card, "hera"))[fsdp2] == pytest.approx(
        (4 * 8.79e9 + 12 * 2.2e7) / 2 + 2 * (2 * 2e8 + 1.25e9) + 4 * GIB)


@pytest.mark.parametrize("gib", [24, 80])
def test_a_card_holds_its_gib_not_its_gb(gib: int) -> None:
    """A step needing 1.02 x G x 1e9 bytes fits a card of G GiB (G x 1.074e9 bytes), as the report says; one byte
    over G x 2**30 does not."""
    card = cards.Card("toy", 100.0, gib)
    assert card.holds(1.02 * gib * 1e9) and not card.holds(gib * GIB + 1)
    assert report.fit_line(1.02 * gib * 1e9, card).startswith("  fits: ")
    assert report.fit_line(gib * GIB + 1, card).startswith("  does NOT fit: ")


@pytest.mark.parametrize(("seconds", "said"), [((17.4, 28.2), "17.40-28.20 s"), ((0.4, 0.9), "0.40-0.90 s"),
                                               ((0.004, 0.009), "0.004-0.009 s"), ((600, 1000), "10.00-16.67 min"),
                                               ((6 * 3600, 11 * 3600), "6.00-11.00 h"), ((400, 700), "6.67-11.67 min")])
def test_a_time_is_said_in_the_unit_that_reads_it(seconds, said) -> None:
    """A ZeRO-3 run of 17-28 s is not "0.00-0.01 h": each band in seconds, minutes or hours, never rounded to 0."""
    assert report.duration(seconds) == said


def test_communication_per_engine_on_the_cards_link() -> None:
    """Each GPU of a ring receives (N - 1) / N of every whole (counted rank by rank): FSDP2 the bf16 parameters in
    forward and again in backward plus the float32 LoRA gradients every micro-step; a micro-step takes the longest of
    its compute, its host work (none here) and its communication at the link's rate each way (H100 SXM: NVLink
    900 GB/s, 450 each way; H100 PCIe: PCIe Gen5 128 GB/s); DDP's all-reduce of the gradients once a step; one GPU
    none."""
    counts = {**COUNTS, "params": 73.5e9, "trainable": 1.05e8}
    fsdp = setup(engine="fsdp2", gpus=8, accumulation=8)
    received = sum(whole / 8 for whole in (2 * 73.5e9, 2 * 73.5e9, 4 * 1.05e8) for rank in range(8) if rank != 0)
    assert estimate.communicated(counts, fsdp) == (pytest.approx(received), 0.0)
    floor = 89.00e12 / (989.4e12 * 0.380)  # the measured LoRA floor (tests/test_plan_time.py)
    for card, rate in (("H100-SXM", 450e9), ("H100-PCIe", 64e9)):
        t = timing.times(1e15, 0, fsdp, cards.CARDS[card], 1000, 100, estimate.communicated(counts, fsdp))
        peak = cards.CARDS[card].bf16_tflops * 1e12
        assert t["step"] == pytest.approx(tuple(8 * max(1e15 / (peak * share), received / rate)
                                                for share in (1, floor)))
        assert t["communication"] == pytest.approx(8 * received / rate)
    assert estimate.communicated(counts, setup(gpus=4)) == (0.0, pytest.approx(2 * 3 / 4 * 4 * 1.05e8))
    assert estimate.communicated(counts, setup()) == (0.0, 0.0)


@pytest.fixture
def tiny_recipe(tmp_path):
    folder = tmp_path / "model"
    config = tiny_config(layers=2, depth=1)
    config.vision_config.deepstack_visual_indexes = [0]
    config.save_pretrained(folder)
    recipe = {"model_name_or_path": str(folder), "stage": "sft", "finetuning_type": "lora", "lora_rank": 4,
              "quantization_bit": 4, "enable_liger_kernel": True, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 2, "cutoff_len": 32, "image_max_pixels": 64 * 64}
    path = tmp_path / "tiny.yaml"
    launch = "accelerate launch --config_file recipes/accelerate/fsdp2_config.yaml -m llamafactory.launcher tiny.yaml"
    path.write_text(f"# Run: {launch}\n{yaml.safe_dump(recipe)}")
    return path


def test_plan_prints_the_report_and_a_fix_when_the_card_is_too_small(tiny_recipe, monkeypatch, capsys) -> None:
    """The tiny model's QLoRA step (one count: 2 layers, 1 block) on a card of 2 GiB and 64 KiB: the reserve alone
    leaves 64 KiB, less than the tiny model's bf16 load; halving the micro-batch is told with its figure. The recipe's
    Liger is off with a note (LLaMA-Factory patches no Qwen3-VL), and not offered as a fix."""
    monkeypatch.setitem(cards.CARDS, "toy", cards.Card("toy", 100.0, 2 + 2**-14))
    assert main(["plan", str(tiny_recipe), "--gpu", "toy"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out
    assert "    each line below, added to this plan command, plans its change:\n" \
        "    per_device_train_batch_size=1 gradient_accumulation_steps=4: 2.00 GiB" in out
    assert "stage sft, LoRA, 4-bit, DDP, micro-batch 2 x accumulation 2, cutoff_len 32, Liger off" in out
    assert "  note: enable_liger_kernel: LLaMA-Factory does not patch qwen3_vl; the run trains without Liger" in out
    assert "enable_liger_kernel=true" not in out
    assert "  note: launch: planned as DDP on 1 GPU(s), no --accelerate-config given; the recipe's header names a " \
        "launch with accelerate launch --config_file recipes/accelerate/fsdp2_config.yaml: plan it with " \
        "--accelerate-config recipes/accelerate/fsdp2_config.yaml" in out
    assert "lengths: worst case (the recipe's rows cannot be read and tokenized offline: the recipe names no " \
        "dataset), every row 32 tokens with one image of 4 tokens" in out
    assert "HeRA" not in out and "teacher" not in out  # the SFT stage: no twin, no teacher
    assert math.isfinite(float(out.split("step peak")[1].split()[0]))


def test_plan_errors(tiny_recipe, tmp_path, capsys) -> None:
    assert main(["plan", str(tiny_recipe), "--gpu", "B200"]) == 2
    err = capsys.readouterr().err
    assert "--gpu: unknown card 'B200'; known: H100-SXM, H100-PCIe, H200" in err and "A10G" in err
    assert main(["plan", str(tiny_recipe), f"model_name_or_path={tmp_path / 'absent'}"]) == 2
    err = capsys.readouterr().err
    assert f"model_name_or_path: no config.json of {tmp_path / 'absent'} at hand" in err
    assert "hf download" in err
    assert main(["plan", str(tiny_recipe), "deepspeed=absent.json"]) == 2
    assert "deepspeed: absent.json cannot be read" in capsys.readouterr().err
    for argv, said in [(["cutoff_len", "8"], "cutoff_len: KEY=VALUE expected, as on llamafactory-cli's line"),
                       (["cutoff_len=1k"], "cutoff_len: '1k' is not a number; cutoff_len is the longest tokenized row"),
                       (["stage=dpo"], "stage: plan counts sft, pt, hera, harc, rah, not dpo"),
                       (["--accelerate-config", str(tmp_path / "none.yaml")],
                        f"--accelerate-config: {tmp_path / 'none.yaml'} cannot be read")]:
        assert main(["plan", str(tiny_recipe), *argv]) == 2, argv
        assert said in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as stop:  # argparse's own usage error
        main(["plan", str(tiny_recipe), "--gpus", "0"])
    assert stop.value.code == 2
    assert "argument --gpus: '0' is not a number of GPUs (1 or more)" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "said"), [
    ("per_device_batch_size=4", "per_device_batch_size: 4 (did you mean per_device_eval_batch_size?): not a recipe "
     "key of LLaMA-Factory"),
    ("lora_rank=eight", "lora_rank: 'eight' is not a number; lora_rank is the rank of each LoRA update. Set a number."),
    ("hera_heads=[L40H20]", "hera_heads: L40H20 is outside"),
    ("hera_temperature=hot", "hera_temperature: got 'hot'; expected a number."),
])
def test_plan_refuses_what_training_refuses_with_its_line(tiny_recipe, override, said, capsys) -> None:
    """A HeRA recipe's override is read and checked as ``llamafactory-cli train`` checks it before any rank starts
    (``check_before_ranks``, in process): the same one line, before any count."""
    from llamafactory_hera_patches.launch import check_before_ranks

    recipe = {**yaml.safe_load(tiny_recipe.read_text()), "stage": "hera", "quantization_bit": None,
              "hera_heads": ["L0H1"], "hera_lambda": 0.1,
              "enable_liger_kernel": False}  # training asks this machine for liger-kernel first; plan does not
    tiny_recipe.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as training:
        check_before_ranks(["llamafactory-cli", "train", str(tiny_recipe), override])
    assert main(["plan", str(tiny_recipe), override]) == 2
    assert capsys.readouterr().err.strip().endswith(str(training.value)) and said in str(training.value)


def test_auto_heads_are_packed_into_layers_of_the_models_heads() -> None:
    """``hera_heads: auto`` with 5 heads on a model of 4 heads a layer: the selection may take them from any layer,
    so plan counts them in 2 layers (one layer of 5 heads does not exist); named heads keep their layers' count."""
    assert count.head_layers("auto", 5, 4) == (["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"], 2)
    assert count.head_layers("auto", 4, 16) == (["L0H0", "L0H1", "L0H2", "L0H3"], 1)
    assert count.head_layers(["L7H1", "L3H2", "L7H0"], 0) == (["L1H1", "L0H2", "L1H0"], 2)


def test_the_engine_and_gpus_of_an_accelerate_config(tmp_path) -> None:
    """DeepSpeed named in an accelerate config is its ZeRO stage (its offload said as not counted), its processes the
    GPUs, also beside a recipe's ``deepspeed``; FSDP version 1 is planned as FSDP2 and said so; a shipped recipe's
    DeepSpeed path is found from any folder."""
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_processes": 8, "deepspeed_config": {
        "zero_stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    got = estimate.setup_of({}, tmp_path, None, config)
    assert (got.engine, got.gpus) == ("zero3", 8)
    assert got.notes == ("deepspeed: offload_optimizer to the CPU is not counted (planned as kept on the GPU)",)
    shipped = estimate.setup_of({"deepspeed": "recipes/deepspeed/ds_z3_config.json"},
                                REPO / "recipes" / "llava15", None, config)
    assert (shipped.engine, shipped.gpus) == ("zero3", 8)
    config.write_text(yaml.safe_dump({"distributed_type": "FSDP", "num_processes": 4, "fsdp_config": {
        "fsdp_version": 1}}))
    got = estimate.setup_of({}, tmp_path, None, config)
    assert (got.engine, got.gpus) == ("fsdp2", 4) and "FSDP version 1 is planned as FSDP2" in got.notes[0]


def sampled_recipe(assets, tmp_path, **changes):
    recipe = {"model_name_or_path": str(assets.models["qwen3_vl"]), "template": assets.templates["qwen3_vl"],
              "dataset": "hera_demo_mixed", "dataset_dir": str(assets.dataset_dir), "stage": "sft",
              "finetuning_type": "lora", "lora_rank": 4, "per_device_train_batch_size": 2, "cutoff_len": 1024,
              "image_max_pixels": 64 * 64, **changes}
    path = tmp_path / "sampled.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return recipe, path


@pytest.mark.parametrize("cutoff", [1024, 24])  # every row whole; most rows cut
def test_sampled_lengths_equal_each_rows_own_tokenization(assets, tmp_path, cutoff) -> None:
    """Every row of the tiny dataset (fewer than the sample) through LLaMA-Factory's training tokenization equals the
    row encoded by its template turn by turn (its image tokens as its processor expands them), cut at cutoff_len."""
    recipe, _ = sampled_recipe(assets, tmp_path, cutoff_len=cutoff)
    total, rows = sampled_rows(recipe, 300, 0)
    args = parse_recipe(recipe)
    tokenizer_module = load_tokenizer(args.model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], args.data_args)
    aligned = load_aligned_rows(args, 0)
    whole = [(length, len(row["_images"] or []), images) for row in aligned for images, length in
             [whole_row(template, tokenizer_module["tokenizer"], tokenizer_module["processor"], row)]]
    assert any(length > 24 for length, _, _ in whole)
    assert total == len(aligned) == len(rows) and any(images == 0 for _, images, _ in whole)
    assert sorted(r[0] for r in rows) == sorted(min(length, cutoff) for length, _, _ in whole)
    assert sorted(r[1] for r in rows) == sorted(n for _, n, _ in whole)
    if cutoff == 1024:
        assert sorted(rows) == sorted(whole)


def test_plan_reads_the_recipes_rows_and_falls_back_to_the_worst_case(assets, tmp_path, capsys,
                                                                     monkeypatch) -> None:
    """Every row sampled: memory at the longest; 8 of 32 sampled: memory at the worst case (a row not sampled may be
    longer), time at the sample's mean either way; no dataset: the worst case, named."""
    recipe, path = sampled_recipe(assets, tmp_path)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: ")  # nothing LLaMA-Factory prints while it tokenizes
    assert "\n  lengths: from 32 sampled rows of hera_demo_mixed (seed 0; 32 rows to train on): tokens mean " in out
    assert " 8 rows without; memory at the longest row" in out and "epoch of 32 rows, 16 steps" in out
    missing = lengths.lengths_of({**recipe, "dataset": "absent"}, path, 2, 1024, 4)
    assert missing.line.startswith("lengths: worst case (the recipe's rows cannot be read and tokenized offline: ")
    assert "absent" in missing.line and missing.line.endswith("), every row 1024 tokens with one image of 4 tokens")
    assert (missing.peak, missing.padded, missing.rows) == (1024, 1024, None)
    whole = lengths.lengths_of(recipe, path, 2, 1024, 4)
    monkeypatch.setattr(lengths, "SAMPLE", 8)
    part = lengths.lengths_of(recipe, path, 2, 1024, 4)
    assert whole.peak < 1024 and (part.peak, part.image_tokens, part.rows) == (1024, 4, 32)
    assert "memory at cutoff_len with an image of image_max_pixels (4 tokens)" in part.line


def test_frozen_decoder_layers_run_unchecked_as_llamafactory_calls_them() -> None:
    """LLaMA-Factory checkpoints only the layers with a trainable parameter and calls a frozen one plainly, so a
    projector-only run (LLaVA-1.5's stage 1: the gradient passes through every frozen decoder layer) keeps each layer's
    activations under ``gradient_checkpointing`` as without it; HeRA's heads in a frozen layer add no more than their
    own tensors to that (the SFT twin is counted the same way)."""
    config = tiny_config(layers=2, depth=1)
    config.vision_config.deepstack_visual_indexes = [0]
    projector = {"lora_rank": None, "parts": ("projector",)}
    checked, unchecked = (count.count(config, shape(checkpointing=on, **projector)) for on in (True, False))
    assert checked["activations"] == unchecked["activations"]
    lora = count.count(config, shape())  # LoRA in every decoder layer: each checkpointed, fewer activations kept
    assert lora["activations"] < checked["activations"]
    heads, _ = count.head_layers(["L0H0", "L0H1"], 2)
    hera = count.count(config, shape(hera={"hera_lambda": 0.01, "hera_k": 1, "heads": heads}, **projector))
    assert 0 <= hera["activations"] - checked["activations"] < 0.05 * checked["activations"]


@pytest.mark.parametrize("recipe", [{}, {"freeze_multi_modal_projector": False},
                                    {"freeze_vision_tower": False, "freeze_language_model": True}])
def test_a_full_fine_tune_trains_what_llamafactory_trains(recipe) -> None:
    """Qwen3-VL under finetuning_type: full: the parameters plan trains are those LLaMA-Factory's freeze keys leave
    trainable (its COMPOSITE_MODELS' keys matched in each name, as its full tuning matches them): the DeepStack
    mergers are frozen with the vision tower, not trained with the projector."""
    from llamafactory.model.model_utils.visual import COMPOSITE_MODELS

    from llamafactory_hera.plan import methods, step

    keys = COMPOSITE_MODELS["qwen3_vl"]
    frozen = [*(keys.vision_model_keys if recipe.get("freeze_vision_tower", True) else []),
              *(keys.projector_keys if recipe.get("freeze_multi_modal_projector", True) else []),
              *(keys.language_model_keys if recipe.get("freeze_language_model", False) else [])]
    model = step.build(tiny_config(layers=1, depth=2))
    step.set_trainable(model, methods.trained_parts(recipe))
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained == {name for name, _ in model.named_parameters() if not any(key in name for key in frozen)}
    assert any("deepstack_merger" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(("name", "mib", "card"), [
    ("NVIDIA H100 80GB HBM3", 81559, "H100-SXM"), ("NVIDIA H100 PCIe", 81559, "H100-PCIe"),
    ("NVIDIA A100-SXM4-40GB", 40960, "A100-40GB"), ("NVIDIA A100-SXM4-80GB", 81920, "A100-80GB"),
    ("NVIDIA GeForce RTX 4090", 24564, "RTX-4090"), ("NVIDIA A10G", 23028, "A10G"),
    ("NVIDIA B200", 183359, "H100-SXM")])
def test_the_board_plans_on_the_machines_own_card(monkeypatch, name, mib, card) -> None:
    """LlamaBoard's plan takes the card of the first GPU: its model in the device's name, the nearest memory; a card
    plan does not know (or no GPU) is the default card, which the report's first line names."""
    from types import SimpleNamespace

    from llamafactory_hera.plan import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(name=name,
                                                                                        total_memory=mib * 2**20))
    assert cli.card_here() == card


def test_a_pair_of_fixes_sets_two_different_keys() -> None:
    """An 8B-sized LoRA step at a micro-batch of 4 on a 24 GB card: neither halving nor quartering the micro-batch fits
    alone, both together would be a micro-batch of 1/2; each pair offered joins two different changes (the micro-batch
    with more GPUs), never one key set twice."""
    big = {"params": 8.79e9, "trainable": 2.2e7, "quantizable": 7.5e9, "embedding": 1.25e9, "layer": 2e8,
           "activations": 14 * GIB, "temporaries": 18.5 * GIB}
    card = cards.CARDS["RTX-4090"]
    fixes = estimate.fixes({"hera": big}, setup(batch=4, cutoff=4096), card, "hera")
    pairs = [change for change, _ in fixes if len(change) == 2]
    assert pairs and all(card.holds(need) for change, need in fixes if len(change) == 2)
    assert all(first.split("=")[0].split()[0] != second.split("=")[0].split()[0] for first, second in pairs), pairs
    assert ("per_device_train_batch_size=1 gradient_accumulation_steps=8",
            "--gpus 4 --accelerate-config recipes/accelerate/fsdp2_config.yaml") in pairs


def test_the_zero_stages_communicate_as_their_collectives() -> None:
    """On 4 GPUs each receives 3/4 of every whole (counted rank by rank): ZeRO-3 gathers the bf16 parameters in
    forward and again in backward (4-bit codes as stored: nf4 with double quantization) and reduce-scatters the bf16
    gradients every micro-step, nothing more a step; ZeRO-2 reduce-scatters the bf16 gradients every micro-step and
    gathers the updated bf16 weights once a step."""
    counts = {**COUNTS, "params": 73.5e9, "trainable": 1.05e8, "quantizable": 70e9}

    def received(*wholes: float) -> float:
        return sum(whole / 4 for whole in wholes for rank in range(4) if rank != 0)

    weights = 2 * 73.5e9
    assert estimate.communicated(counts, setup(engine="zero3", gpus=4)) == (
        pytest.approx(received(weights, weights, 2 * 1.05e8)), 0.0)
    nf4 = 2 * 3.5e9 + 70e9 * (0.5 + (1 + 4 / 256) / 64)
    assert estimate.communicated(counts, setup(engine="zero3", gpus=4, bits=4)) == (
        pytest.approx(received(nf4, nf4, 2 * 1.05e8)), 0.0)
    assert estimate.communicated(counts, setup(engine="zero2", gpus=4)) == (
        pytest.approx(received(2 * 1.05e8)), pytest.approx(received(2 * 1.05e8)))


def test_a_methods_passes_outside_the_step_are_timed_as_a_step_of_their_kind() -> None:
    """RAH-LoRA's and HARC's passes on one GPU (100 s of an H100's peak, no host work): from the peak to the measured
    floor of a LoRA step (89.00 TFLOPs in 380 ms on an H200) in bf16, of a QLoRA step (611.9 ms) on a 4-bit model."""
    card = cards.CARDS["H100-SXM"]
    assert methods._seconds(100 * 989.4e12, 0, card, None) == "1.67-7.04 min"  # 100 s, 100 / 0.2367 s
    assert methods._seconds(100 * 989.4e12, 0, card, 4) == "1.67-11.34 min"  # 100 / 0.1470 s
    assert methods._seconds(0, 10_000, card, None) == "0.15-0.26 s"  # 10,000 ops x 15.0-26.3 us
