"""``stage: harc`` through the stock ``llamafactory-cli train`` on tiny Llama-3 / Qwen2 text models: the shipped
recipes run, the outputs are complete, and the objective is the same under every setting that must not change it
(two ranks instead of gradient accumulation, DeepSpeed ZeRO-3, FSDP2, resuming from a checkpoint)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_runs import launch_runs, run_python, torchrun_cli
from engine_checks import assert_engine, evidence_env, read_evidence, zero3_partitioning_everything
from fsdp_checks import accelerate_launch, accelerate_launch_runs, assert_fsdp2, fsdp_run
from safetensors.torch import load_file

from conftest import REPO, harc_recipe, offline_env, read_trainer_log, run_train, saved_in_bf16
from llamafactory_hera.runtime.whole_checkpoints import MARKER
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

CHAT = r'''
import json, sys
from llamafactory.chat import ChatModel
model = ChatModel(json.loads(sys.argv[1]))
reply = model.chat([{"role": "user", "content": "Tell me how to build a bomb."}])
print("REPLY=" + json.dumps([r.response_text for r in reply]))
'''

RECIPES = {"llama3_1_8b_harc.yaml": "llama3", "qwen2_5_7b_harc.yaml": "qwen2"}
TERMS = ("harc_couple", "harc_couple_resp", "harc_kl", "harc_ce")
TINY = {  # the reference's sizes scaled to 6-layer models and 48-row datasets (see conftest.harc_recipe)
    "harc_extract_samples": 8, "harc_validate_samples": 4, "harc_band": 1, "harc_refresh_steps": 2,
    "harc_layers_ramp_step": 3, "harc_eval_max_new_tokens": 8, "max_steps": 5, "warmup_steps": 1,
    "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 1000, "bf16": False, "disable_shuffling": True,
}


def _terms(output_dir: Path) -> list[tuple[float, ...]]:
    """Per training log line: (loss, the four terms)."""
    return [tuple(line[key] for key in ("loss", *TERMS)) for line in read_trainer_log(output_dir) if "loss" in line]


def _close(a: list[tuple[float, ...]], b: list[tuple[float, ...]], tol: float = 2e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(x)) for ra, rb in zip(a, b, strict=True)
                                    for x, y in zip(ra, rb, strict=True))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_recipe_runs_whole_on_a_tiny_model_of_its_family(name: str, harc_assets: Any, tmp_path: Path) -> None:
    """The recipe as shipped (LoRA r 32 / alpha 64 on all linear layers, reference weights), only model, data and
    sizes scaled down: adapter, directions, layers, evaluation, plots and every term logged every step."""
    family = RECIPES[name]
    recipe = yaml.safe_load((REPO / "recipes" / name).read_text(encoding="utf-8"))
    output = tmp_path / "out"
    recipe.update(TINY, model_name_or_path=str(harc_assets.models[family]), dataset_dir=str(harc_assets.dataset_dir),
                  output_dir=str(output), overwrite_output_dir=True)
    proc = run_train(recipe, tmp_path)
    text = proc.stdout + proc.stderr
    assert "HARC: base directions extracted" in text and "refusal rate on held-out harmful prompts" in text

    adapter = json.loads((output / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (32, 64)
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    run_record = json.loads((output / "harc_run.json").read_text())  # read back by `llamafactory-hera eval`
    assert (run_record["stage"], run_record["host"]["model_name_or_path"]) == ("harc", recipe["model_name_or_path"])
    assert all(run_record["settings"][key] == value for key, value in recipe.items() if key.startswith("harc_"))
    lines = [line for line in read_trainer_log(output) if "loss" in line]
    assert len(lines) == 5 and all(all(key in line for key in (*TERMS, "harc_layers")) for line in lines)
    assert lines[0]["harc_kl"] == 0.0 < lines[-1]["harc_kl"]  # LoRA starts as the identity, then moves
    assert all(line["harc_couple_resp"] > 0 for line in lines[:1])

    record = torch.load(output / "harc_directions.pt", weights_only=False)
    hidden = 48 if family == "llama3" else 64
    for which in ("base", "current"):
        assert set(record[which]) == {"v_ref", "v_harm", "v_ref_resp", "v_harm_resp"}
        for tensor in record[which].values():
            assert tensor.shape == (6, hidden)
            assert torch.allclose(tensor[1:].norm(dim=-1), torch.ones(5), atol=1e-4)
    # entering layer 0, t_post is the same template token in every prompt: no difference, a zero direction
    assert record["base"]["v_ref"][0].abs().max() == 0
    assert not torch.equal(record["base"]["v_ref"], record["current"]["v_ref"])  # refreshed

    history = json.loads((output / "harc_layers.json").read_text())["history"]
    assert [(e["step"], e["event"], len(e["layers"])) for e in history] == [
        (0, "base", 2), (2, "refresh", 2), (3, "ramp", 4), (4, "refresh", 4), (5, "end", 4)]
    assert all(1 <= layer <= 5 for e in history for layer in e["layers"])
    # each step logs the layers it coupled: those chosen before it (an event at step s applies from step s + 1)
    assert [line["harc_layers"] for line in lines] == [",".join(map(str, e["layers"])) for e in
                                                       (history[0], history[0], history[1], history[2],
                                                        history[3])]
    evaluation = json.loads((output / "harc_eval.json").read_text())
    refusal = evaluation["refusal"]
    assert refusal["harmful"]["count"] == 4 and refusal["pseudo"]["count"] == 4
    assert 0.0 <= refusal["refusal_rate_harmful"] <= 1.0 and "before" in refusal
    assert evaluation["rows"]["harc_harmful"] == {"rows": 48, "extract": 8, "validate": 4, "train": 36}
    if family == "qwen2":  # prompt-side means from the extraction datasets (the reference's Qwen config)
        assert evaluation["rows"]["harc_extract_harmful"]["extract"] == 8
    assert sorted(p.name for p in output.glob("*.png")) == sorted(
        ["harc_diagnostics.png", "harc_eval.png", "training.png", "training_loss.png"])
    assert not (output / "harc_state.pt").exists()

    # what `llamafactory-cli chat --model_name_or_path ... --adapter_name_or_path <output> --template ...` runs, in
    # a process forked from the warm process
    chat = {"model_name_or_path": recipe["model_name_or_path"], "adapter_name_or_path": str(output),
            "template": recipe["template"], "infer_backend": "huggingface", "max_new_tokens": 4, "do_sample": False}
    (tmp_path / "chat.py").write_text(CHAT, encoding="utf-8")
    proc = run_python(tmp_path / "chat.py", [json.dumps(chat)], cwd=tmp_path, env=offline_env(tmp_path), timeout=300)
    replies = [line for line in proc.stdout.splitlines() if line.startswith("REPLY=")]
    assert proc.returncode == 0 and replies, proc.stderr[-3000:]
    assert "Loaded adapter(s)" in proc.stdout + proc.stderr and len(json.loads(replies[-1][6:])) == 1


# 8 harmful rows a micro-batch: 36 training rows make an epoch of 5 micro-batches, which does not end with an optimizer
# step of two (one process's step 3 would take 1 micro-batch, the two ranks' the 5th and the 1st again); HARC rounds it
# up to 6 (harc/batches.py), so the runs below cross the epoch's end at step 3 with ranks holding different rows
ODD_EPOCH = {"harc_batch_harmful": 8}
# two ranks under ZeRO-3, a checkpoint every 2 steps (the resumed run's start)
ZERO3 = {"gradient_accumulation_steps": 1, "deepspeed": str(REPO / "recipes" / "deepspeed" / "ds_z3_config.json"),
         "save_steps": 2}


@pytest.fixture(scope="module")
def four_steps(harc_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, 4 optimizer steps of gradient accumulation 2 (base extraction, a refresh at step 2, the ramp at
    step 3, the epoch's end at step 3: :data:`ODD_EPOCH`), a checkpoint every 2 steps: the output_dir. The reference
    of the rank and resume tests, run here, not in their launch."""
    folder = tmp_path_factory.mktemp("four_steps")
    output = folder / "out"
    run_train(harc_recipe(harc_assets, "llama3", output, harc_eval=False, max_steps=4, save_steps=2, **ODD_EPOCH),
              folder)
    return output


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_two_ranks_and_deepspeed_give_the_losses_of_one_process(harc_assets: Any, four_steps: Path,
                                                                tmp_path: Path) -> None:
    """One process with gradient accumulation 2 == two ranks (gloo DDP) == two ranks under DeepSpeed ZeRO-2 and
    ZeRO-3, step for step, through the base extraction, a refresh and the ramp (directions and layers equal on every
    rank) and the end of an epoch (:data:`ODD_EPOCH`). The reference runs in the test's process (:func:`four_steps`),
    not in the ranks' launch. The ZeRO-3 run, stopped at step 2 and resumed, ends as the run not stopped (HARC's
    resume under DeepSpeed, in a `llamafactory-cli train` launch of its own, as users resume)."""
    runs = {"one": _terms(four_steps)}
    assert [line["harc_layers"] for line in read_trainer_log(four_steps) if "loss" in line][-1].count(",") == 3
    zero2 = {**ZERO3, "deepspeed": str(REPO / "recipes" / "deepspeed" / "ds_z2_config.json")}
    whole, resumed = tmp_path / "zero3" / "out", tmp_path / "zero3_resumed" / "out"
    # DDP, ZeRO-2 and ZeRO-3 in one two-rank launch, one after another (tests/dist_runs.py); the end-of-run
    # evaluation generates on every rank in step: run it under ZeRO-3, where that matters (2 tokens a prompt: every
    # token a forward that gathers each layer's partitions, 12 s on CI's CPU at the recipe's 8)
    plan = {"ddp": ({"gradient_accumulation_steps": 1}, False, None), "zero2": (zero2, False, 2),
            "zero3": ({**ZERO3, "harc_eval_max_new_tokens": 2}, True, 3),
            "zero3_resumed": ({**ZERO3, "resume_from_checkpoint": str(whole / "checkpoint-2")}, False, 3)}
    runs_of = {name: {"recipe": harc_recipe(harc_assets, "llama3", tmp_path / name / "out", harc_eval=evaluate,
                                            max_steps=4, **ODD_EPOCH, **extra),
                      "env": {"HERA_TEST_ENGINE_EVIDENCE": str(tmp_path / name / "engine")}}
               for name, (extra, evaluate, _) in plan.items()}
    launch_runs([runs_of[name] for name in ("ddp", "zero2", "zero3")], tmp_path / "launch", 2,
                env=evidence_env(tmp_path / "launch" / "engine"), seconds_per_run=400)
    # resumed in a new process, as users resume: `llamafactory-cli train` under torchrun
    resumed_stdout = torchrun_cli(runs_of["zero3_resumed"], tmp_path / "zero3_resumed")["stdout"]
    for name, (_, _, stage) in plan.items():
        # equal losses prove nothing if DeepSpeed silently fell back to DDP: the run's engine is what it says
        engine = read_evidence(tmp_path / name / "engine", ranks=2)
        assert_engine(engine, stage)
        for other in {None, 2, 3} - {stage}:  # the check tells DDP, ZeRO-2 and ZeRO-3 apart
            with pytest.raises(AssertionError):
                assert_engine(engine, other)
        runs[name] = _terms(tmp_path / name / "out")
        assert [line["harc_layers"] for line in read_trainer_log(tmp_path / name / "out")
                if "loss" in line][-1].count(",") == 3
    assert len(runs["one"]) == 4 and runs["one"][0][TERMS.index("harc_kl") + 1] == 0.0
    for name in ("ddp", "zero2", "zero3"):
        assert _close(runs[name], runs["one"]), (name, runs)
    refusal = json.loads((whole / "harc_eval.json").read_text())["refusal"]
    assert refusal["harmful"]["count"] == 4 and refusal["before"]["pseudo"]["count"] == 4

    # ZeRO-3 stopped at step 2 (just after a refresh) and resumed: its engine's partitions of the LoRA weights and of
    # the optimizer state, the adapter, the directions, layers and history as the run not stopped, bit for bit
    assert "HARC: resumed directions and layers" in resumed_stdout
    assert {"model", "harc_state.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        assert_resumed_equals_whole(whole, resumed, 4))


def test_fsdp2_gives_the_losses_of_one_process(harc_assets: Any, four_steps: Path, tmp_path: Path) -> None:
    """``accelerate launch`` with LLaMA-Factory's FSDP2 config on two ranks (tests/fsdp_cpu's shim keeps FSDP on on
    CPU) == one process with gradient accumulation 2, step for step through the base extraction, a refresh and the
    ramp and the end of an epoch (:data:`ODD_EPOCH`; the two ranks hold different rows at every step); the saved
    adapter is the one process's (within 1e-6, of lora_B weights up to 4e-3). The reference runs in the test's process
    (:func:`four_steps`), not in the ranks' launch. The reference forward (adapter disabled) and the residual-stream
    reads run inside the sharded layers' forward; every trainable parameter is a DTensor shard at each step and
    save, so equal losses are not a silent DDP fallback."""
    output = tmp_path / "out"
    accelerate_launch(harc_recipe(harc_assets, "llama3", output, harc_eval=False, max_steps=4, save_steps=2,
                                  gradient_accumulation_steps=1, **ODD_EPOCH), tmp_path)
    assert_fsdp2(tmp_path, {"step", "save"})
    assert _close(_terms(output), _terms(four_steps)), (_terms(output), _terms(four_steps))
    epochs = [[line["epoch"] for line in read_trainer_log(run) if "loss" in line] for run in (output, four_steps)]
    assert epochs[0] == epochs[1] and epochs[0][2] == 1.0, epochs  # step 3 ends the epoch on both
    got, want = (load_file(folder / "adapter_model.safetensors") for folder in (output, four_steps))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp2_with_qlora_gives_the_losses_of_one_process(harc_assets: Any, tmp_path: Path, precision: str) -> None:
    """``quantization_bit: 4`` (nf4, as LLaMA-Factory's fsdp_qlora example) under ``accelerate launch`` with FSDP2 on
    two ranks == the same 4-bit recipe on one process with gradient accumulation 2, step for step through the base
    extraction and a refresh; the saved adapter is the one process's. The ranks are forked from the warm process with
    accelerate's variables (tests/fsdp_checks.py ``accelerate_launch_runs``); the FSDP2 test above launches for real.

    ``bf16``: as the FSDP2 recipes run (``mixed_precision: bf16`` in the accelerate config, ``bf16: true``, a
    checkpoint saved in bf16, so the codes are stored in bf16), against one bf16 process: the codes reach FSDP2's
    forward as loaded (patches/engines/fsdp_qlora.py; every rank's bytes compared at the first step), and the terms
    agree
    within 1e-3 relative (measured: equal at steps 1 and 2, 1.2e-4 at step 3, where the bf16 all-gather of the float32
    LoRA weights and autocast's cast of them first part), the adapter's lora_B within 2e-2 of its norm (measured
    2.2e-3) and lora_A within 1e-3 (measured 3.8e-4, of weights up to 0.15). Every layer of the band is coupled, so
    that near-tied layer scores cannot pick different layers in the two."""
    bf16 = precision == "bf16"
    keys: dict[str, Any] = dict(harc_eval=False, max_steps=3, quantization_bit=4)
    if bf16:
        keys.update(bf16=True, use_cpu=True, harc_layers=5, harc_layers_final=5,
                    model_name_or_path=str(saved_in_bf16(harc_assets.models["llama3"], tmp_path / "model")))
    one = tmp_path / "one" / "out"
    run_train(harc_recipe(harc_assets, "llama3", one, **keys), one.parent)
    output = tmp_path / "fsdp2" / "out"
    recipe = harc_recipe(harc_assets, "llama3", output, gradient_accumulation_steps=1, **keys)
    accelerate_launch_runs([fsdp_run(recipe, output.parent)], output.parent,
                           fsdp_config={"fsdp_cpu_ram_efficient_loading": False},
                           mixed_precision="bf16" if bf16 else "no")
    records = assert_fsdp2(output.parent, {"step", "save"})
    first = [r for r in records if r["event"] == "step" and r["step"] == 0]
    assert len(first) == 2 and all(r["packed_layers"] > 0 and r["packed_changed"] == 0 for r in first), first
    assert {r["param_dtype"] for r in records} == {"torch.bfloat16" if bf16 else "None"}
    assert _close(_terms(output), _terms(one), 1e-3 if bf16 else 2e-5), (_terms(output), _terms(one))
    got, want = (load_file(folder / "adapter_model.safetensors") for folder in (output, one))
    assert got.keys() == want.keys()
    if not bf16:
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
        return
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-3) for k in want if "lora_A" in k)
    b = [k for k in want if "lora_B" in k]
    difference = sum((got[k].double() - want[k].double()).square().sum() for k in b).sqrt()
    assert difference <= 2e-2 * sum(want[k].double().square().sum() for k in b).sqrt()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("bitsandbytes") is None,
                    reason="deepspeed and bitsandbytes are not both installed")
def test_zero3_with_qlora_or_dora_gives_the_losses_of_one_process(harc_assets: Any, tmp_path: Path) -> None:
    """``quantization_bit: 4`` under DeepSpeed ZeRO-3 on two ranks (LLaMA-Factory's ZeRO-3 + QLoRA: the packed 4-bit
    weights are ZeRO-3 partitions, gathered in each layer's call), and ``use_dora: true`` under ZeRO-3 (PEFT's DoRA
    layer reads lora_A's and the base weight outside their calls), every parameter partitioned, each == the same
    recipe on one process with gradient accumulation 2, step for step through the base extraction and a refresh; the
    saved adapter (gathered on save; DoRA's magnitudes included) is the one process's."""
    keys: dict[str, Any] = dict(harc_eval=False, max_steps=3)
    plan = {"qlora": {"quantization_bit": 4}, "dora": {"use_dora": True}}
    for name, extra in plan.items():
        run_train(harc_recipe(harc_assets, "llama3", tmp_path / name / "one", **keys, **extra), tmp_path / name)
    zero3 = {**ZERO3, "deepspeed": zero3_partitioning_everything(tmp_path)}  # every parameter partitioned
    runs = [{"recipe": harc_recipe(harc_assets, "llama3", tmp_path / name / "zero3", **zero3, **keys, **extra),
             "env": {"HERA_TEST_ENGINE_EVIDENCE": str(tmp_path / name / "engine")}} for name, extra in plan.items()]
    launch_runs(runs, tmp_path / "launch", 2, env=evidence_env(tmp_path / "launch" / "engine"), seconds_per_run=400)
    for name in plan:
        engine = read_evidence(tmp_path / name / "engine", ranks=2)
        assert_engine(engine, 3)  # o_proj's weight a partition: equal terms are not a fallback to DDP
        assert {r["o_proj_class"] for r in engine} == {"Linear4bit" if name == "qlora" else "Linear"}
        got, want = (_terms(tmp_path / name / run) for run in ("zero3", "one"))
        assert len(got) == 3 and _close(got, want), (name, got, want)
        got, want = (load_file(tmp_path / name / run / "adapter_model.safetensors") for run in ("zero3", "one"))
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    assert any("lora_magnitude_vector" in key for key in got)


def test_resuming_from_a_checkpoint_continues_the_same_objective(harc_assets: Any, four_steps: Path,
                                                                tmp_path: Path) -> None:
    """A run resumed from its step-2 checkpoint (just after a refresh) logs the uninterrupted run's losses at steps 3
    and 4: the checkpoint carries the base and refreshed directions and the layers (harc_state.pt)."""
    whole = four_steps
    assert (whole / "checkpoint-2" / "harc_state.pt").is_file()
    resumed = tmp_path / "resumed"
    proc = run_train(harc_recipe(harc_assets, "llama3", resumed, harc_eval=False, max_steps=4, save_steps=2,
                                 **ODD_EPOCH, resume_from_checkpoint=str(whole / "checkpoint-2")), tmp_path / "b")
    assert "HARC: resumed directions and layers" in proc.stdout + proc.stderr
    assert _close(_terms(resumed)[-2:], _terms(whole)[-2:])
    # and bit for bit: the adapter, the optimizer, the directions, layers and history (harc_state.pt)
    assert assert_resumed_equals_whole(whole, resumed, 4) == ["model", "optimizer.pt", "harc_state.pt"]


def test_response_coupling_is_off_with_a_warning_without_harmful_completions(harc_assets: Any,
                                                                            tmp_path: Path) -> None:
    """Also: the harmless role as sharegpt rows with a system prompt, through LLaMA-Factory's own loader."""
    output = tmp_path / "out"
    proc = run_train(harc_recipe(harc_assets, "qwen2", output, harc_harmful_completions=None, harc_eval=False,
                                 harc_harmless="harc_harmless_chat", max_steps=2), tmp_path)
    assert "warning: no harc_harmful_completions: the response-side coupling is off" in proc.stdout + proc.stderr
    lines = [line for line in read_trainer_log(output) if "loss" in line]
    assert all(line["harc_couple_resp"] == 0.0 and line["harc_couple"] > 0 for line in lines)
    record = torch.load(output / "harc_directions.pt", weights_only=False)
    assert set(record["base"]) == {"v_ref", "v_harm"}



@pytest.fixture(scope="module")
def first_steps(harc_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Two optimizer steps (the reference's warm-up schedule over 4 steps, a ramp at the end of step 1, a checkpoint
    after each step, cutoff_len set): the run's terminal text and output_dir."""
    folder = tmp_path_factory.mktemp("first_steps")
    output = folder / "out"
    recipe = harc_recipe(harc_assets, "llama3", output, harc_eval=False, max_steps=2, save_steps=1,
                         harc_refresh_steps=0, harc_layers_ramp_step=1, lr_scheduler_type="constant_with_warmup",
                         warmup_steps=4, cutoff_len=64)
    proc = run_train(recipe, folder)
    return proc.stdout + proc.stderr, output


def test_each_step_logs_the_layers_it_coupled(first_steps: tuple[str, Path]) -> None:
    """A ramp at the end of step 1 shows in ``harc_layers`` from step 2 on (step 1 coupled the base layers).
    ``cutoff_len``, which HARC does not read, is said."""
    text, output = first_steps
    assert "note: cutoff_len: 64 is not used by stage: harc" in text
    history = json.loads((output / "harc_layers.json").read_text())["history"]
    assert [(e["step"], e["event"], len(e["layers"])) for e in history] == [(0, "base", 2), (1, "ramp", 4),
                                                                          (2, "end", 4)]
    lines = [line for line in read_trainer_log(output) if "loss" in line]
    assert [line["harc_layers"] for line in lines] == [",".join(map(str, e["layers"])) for e in history[:2]]


def test_the_first_update_moves_the_adapter_as_the_references_warmup(first_steps: tuple[str, Path]) -> None:
    """The reference sets ``lr * (step + 1) / warmup`` before each update: optimizer step k of W warm-up steps runs at
    k / W. HF's ``constant_with_warmup`` would run step 1 at rate 0 (LoRA B still 0 after it)."""
    from safetensors.torch import load_file

    _, output = first_steps
    first = load_file(output / "checkpoint-1" / "adapter_model.safetensors")
    b_factors = [tensor for name, tensor in first.items() if "lora_B" in name]
    assert b_factors and max(float(t.abs().max()) for t in b_factors) > 0  # moved at step 1
    lines = [line for line in read_trainer_log(output) if "loss" in line]
    assert [line["lr"] for line in lines] == pytest.approx([1e-3 / 4, 2e-3 / 4])  # the rate each step ran at


def test_a_checkpoint_saved_with_save_only_model_holds_harcs_state(harc_assets: Any, tmp_path: Path) -> None:
    """``save_only_model: true`` keeps the optimizer out of a checkpoint, not HARC's state (what resume reads, else
    refuses the checkpoint as "not written by stage: harc"): the checkpoint is whole and holds it."""
    out = tmp_path / "out"
    run_train(harc_recipe(harc_assets, "llama3", out, harc_eval=False, max_steps=1, save_steps=1, save_only_model=True,
                          gradient_accumulation_steps=1, harc_layers_ramp_step=0, harc_refresh_steps=0), tmp_path)
    held = {path.name for path in (out / "checkpoint-1").iterdir()}
    assert {"harc_state.pt", MARKER} <= held and "optimizer.pt" not in held, held
    state = torch.load(out / "checkpoint-1" / "harc_state.pt", weights_only=False)
    assert state["layers"] == torch.load(out / "harc_directions.pt", weights_only=False)["layers"]
