"""Puts the methods' metrics (their ``log_keys``) into ``trainer_log.jsonl``, which LlamaBoard reads.

Checked on LLaMA-Factory 0.9.5: ``LogCallback.on_log`` builds a fixed dict from ``state.log_history[-1]`` for
``_write_log`` on a one-thread pool. The patch keeps the methods' keys of each step's newest entry and merges them into
the training line, or the method's own line.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from llamafactory_hera.runtime.registry import registered_methods


def is_method_key(key: str) -> bool:
    """Whether ``key`` is one of a method's ``log_keys``, or under one ending in ``/`` (``hera_mknn/L1H0``)."""
    for method in registered_methods():
        for name in method.log_keys:
            if key == name or (name.endswith("/") and key.startswith(name)):
                return True
    return False


def apply(callbacks: ModuleType) -> None:
    """Patch ``LogCallback`` (shape checked by the stage patch, which applies this)."""
    log_callback = callbacks.LogCallback
    if getattr(log_callback, "_llamafactory_hera_patched", False):
        return
    original_on_log = log_callback.on_log
    original_write = log_callback._write_log

    def on_log(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        latest = state.log_history[-1] if state.log_history else {}
        extra = {key: value for key, value in latest.items() if is_method_key(key)}
        if extra and getattr(args, "should_save", True):  # other ranks write no log
            self.__dict__.setdefault("_llamafactory_hera_pending", {})[state.global_step] = extra
        return original_on_log(self, args, state, control, **kwargs)

    def _write_log(self: Any, output_dir: str, logs: dict[str, Any]) -> None:
        # training lines and a method's own (HeRA's monitor at a step logging no loss); eval and predict lines keep
        # the stock keys
        if "loss" in logs or not any(key in logs for key in ("eval_loss", "predict_loss")):
            extra = self.__dict__.get("_llamafactory_hera_pending", {}).pop(logs.get("current_steps"), None)
            if extra:
                logs = {**logs, **extra}
        original_write(self, output_dir, logs)

    log_callback.on_log = on_log
    log_callback._write_log = _write_log
    log_callback._llamafactory_hera_patched = True
