"""``torch_compile`` and Liger's kernels with the plugin's stages (docs/configurations.md's rows).

- ``stage: hera`` with ``torch_compile: true`` trains and logs what the same recipe logs uncompiled (two ``run_exp``
  runs in this process, one after the other). Backend ``aot_eager``: dynamo's tracing of HeRA's o_proj hooks and AOT
  autograd through the captured heads, what a compiled HeRA step depends on, without inductor's C++ build of every
  kernel (minutes on a shared CPU; inductor itself builds here, checked by hand on a small function).
- ``stage: harc`` refuses it, naming why; ``stage: rah`` refuses it and Liger's switches: there they do nothing.
- Liger's kernels are triton (GPU only): bench/gpu.sh runs HeRA, HARC and RAH with ``enable_liger_kernel: true``.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from test_launch_refusals import _recipe, _refused

from conftest import read_log_history

TERMS = ("loss", "lm_loss", "hera_loss", "hera_weighted_loss", "hera_mknn")


def _logs_with_and_without(stage: str, keys: dict[str, Any], assets: Any, harc_assets: Any,
                           tmp_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The logged steps of two 2-step runs of ``stage``'s tiny recipe, without and with ``keys``, one after the other
    (each its own ``run_exp``), on one thread."""
    import torch
    from llamafactory.train.tuner import run_exp

    logs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in (("without", {}), ("with", keys)):
            run_exp(_recipe(stage, assets, harc_assets, tmp_path / name, max_steps=2, save_strategy="no", **extra))
            logs.append([line for line in read_log_history(tmp_path / name) if "loss" in line and "step" in line])
    finally:
        torch.set_num_threads(threads)
    assert len(logs[0]) == len(logs[1]) == 2, logs
    return logs[0], logs[1]


def test_hera_compiled_logs_what_it_logs_uncompiled(assets: Any, harc_assets: Any, tmp_path: Path) -> None:
    eager, compiled = _logs_with_and_without("hera", {"torch_compile": True, "torch_compile_backend": "aot_eager"},
                                             assets, harc_assets, tmp_path)
    for plain, step in zip(eager, compiled, strict=True):
        for term in TERMS:
            assert step[term] == pytest.approx(plain[term], rel=1e-4, abs=1e-6), (term, plain, step)


@pytest.mark.skipif(find_spec("liger_kernel") is None or not __import__("torch").cuda.is_available(),
                    reason="no test here: Liger's kernels are triton, GPU only (bench/gpu.sh liger)")
@pytest.mark.parametrize(("stage", "terms"), [("hera", TERMS), ("harc", ("loss", "harc_kl", "harc_ce"))])
def test_liger_trains_each_stage_as_without(stage: str, terms: tuple[str, ...], assets: Any, harc_assets: Any,
                                            tmp_path: Path) -> None:
    """Liger's fused linear cross-entropy (LLaMA-Factory applies it to every stage it runs as sft) never holds the
    logits: HeRA reads the heads' o_proj inputs by hooks, HARC calls the model without labels (its KL and CE read
    the logits, which Liger then computes): both log what they log without it, to the fused kernels' rounding."""
    plain, liger = _logs_with_and_without(stage, {"enable_liger_kernel": True}, assets, harc_assets, tmp_path)
    for before, step in zip(plain, liger, strict=True):
        for term in terms:
            assert step[term] == pytest.approx(before[term], rel=2e-2, abs=1e-4), (term, before, step)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(("stage", "key", "value", "start"), [
    ("harc", "torch_compile", True, "torch_compile: true is not supported by stage: harc: the compiled forward keeps "
                                    "the residual-stream readers it first traced"),
    ("harc", "torch_compile_backend", "inductor", "torch_compile_backend: inductor is not supported by stage: harc"),
    ("rah", "torch_compile", True, "torch_compile: true does nothing in stage: rah: its calibration runs the model in "
                                   "eval mode outside transformers' Trainer"),
    ("rah", "torch_compile_mode", "max-autotune", "torch_compile_mode: max-autotune does nothing in stage: rah"),
    ("rah", "enable_liger_kernel", True, "enable_liger_kernel: true does nothing in stage: rah: "),
])
def test_what_a_stage_cannot_compile_or_does_not_use_is_refused_naming_why(
        stage: str, key: str, value: Any, start: str, assets: Any, harc_assets: Any, tmp_path: Path) -> None:
    """A backend or a mode turns torch.compile on in transformers' TrainingArguments without torch_compile: true."""
    message = _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", **{key: value}))
    assert message.startswith(start) and message.endswith(f"Remove {key}."), message
