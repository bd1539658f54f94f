"""What a resumed run must equal: the uninterrupted run's weights, optimizer state and method state, bit for bit.

``assert_resumed_equals_whole(whole, resumed, step)`` compares two ``output_dir`` folders of the same recipe, one run
through, the other resumed from one of its checkpoints: the final model (full weights or LoRA adapter), and in
``checkpoint-<step>`` of both the Trainer's optimizer state (DeepSpeed: its engine's files, ``global_step<step>/``;
FSDP: its gathered model and optimizer)
and what the methods save beside it (HeRA's temperature, its own optimizer and feature queue; HARC's directions,
layers and history, wall-clock seconds left out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

MODEL_FILES = ("model.safetensors", "adapter_model.safetensors")
# FSDP (FULL_STATE_DICT): the Trainer's resume copies of the model (or adapter) and of the optimizer, gathered
STATE_FILES = ("optimizer.pt", "optimizer.bin", "pytorch_model_fsdp.bin", "hera_temperature_optimizer.pt",
               "hera_queue_rank0.pt", "hera_queue_rank1.pt", "harc_state.pt")


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of nested dicts / lists / tuples / plain objects by its path; timings (``seconds``) left out."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() if key not in ("seconds", "refresh_seconds")
                for k, v in _leaves(item, f"{path}.{key}").items()}
    if isinstance(value, list | tuple):
        return {k: v for index, item in enumerate(value) for k, v in _leaves(item, f"{path}[{index}]").items()}
    if hasattr(value, "__dict__") and not isinstance(value, torch.Tensor | type):  # DeepSpeed's loss scaler
        return _leaves(vars(value), f"{path}:{type(value).__name__}")
    return {path: value}


def differences(want: Any, got: Any) -> list[str]:
    """The paths where ``got`` differs from ``want`` (tensors: ``torch.equal``, bit for bit)."""
    a, b = _leaves(want), _leaves(got)
    if a.keys() != b.keys():
        return [f"keys: {sorted(set(a) ^ set(b))[:5]}"]
    return [key for key in a if not (torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor)
                                     else a[key] == b[key])]


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The saved model of ``folder``: its full weights or its adapter."""
    path = next(folder / name for name in MODEL_FILES if (folder / name).is_file())
    return load_file(path)


def assert_resumed_equals_whole(whole: Path, resumed: Path, step: int) -> list[str]:
    """Assert the two runs end bit-identical; returns the files compared (so a test can check what was there)."""
    compared = ["model"]
    assert not (bad := differences(model_tensors(whole), model_tensors(resumed))), f"weights differ: {bad[:5]}"
    for name in STATE_FILES:
        want_file, got_file = whole / f"checkpoint-{step}" / name, resumed / f"checkpoint-{step}" / name
        assert want_file.is_file() == got_file.is_file(), name
        if want_file.is_file():
            want, got = (torch.load(path, map_location="cpu", weights_only=False) for path in (want_file, got_file))
            assert not (bad := differences(want, got)), f"{name} differs: {bad[:5]}"
            compared.append(name)
    engine = whole / f"checkpoint-{step}" / f"global_step{step}"  # DeepSpeed: its engine's model and optimizer
    for want_file in sorted(engine.glob("*.pt")):
        got_file = resumed / want_file.relative_to(whole)
        want, got = (torch.load(path, map_location="cpu", weights_only=False) for path in (want_file, got_file))
        assert not (bad := differences(want, got)), f"{want_file.name} differs: {bad[:5]}"
        compared.append(want_file.name)
    state = "hera_state.json"
    if (whole / state).is_file():
        want, got = (json.loads((folder / state).read_text())["log_temperature"] for folder in (whole, resumed))
        assert want == got, f"HeRA's temperature differs: {want} != {got}"
        compared.append(state)
    return compared
