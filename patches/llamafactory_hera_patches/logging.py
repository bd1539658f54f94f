"""Puts the methods' metrics (each declaration's ``log_keys``) into ``trainer_log.jsonl`` (what LlamaBoard reads).

Checked on LLaMA-Factory 0.9.5: ``LogCallback.on_log`` builds a fixed dict of keys from
``state.log_history[-1]`` and hands it to ``_write_log`` on a one-thread pool. The patch remembers
the methods' keys of the newest log entry per step and merges them into the line being written (a training
line, or a line of the method's own, e.g. an alignment-monitor point at a step that logs no loss).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from llamafactory_hera.runtime.registry import registered_methods


def is_method_key(key: str) -> bool:
    """Whether a logged key is a registered method's metric: one of its ``log_keys``, or a key under one of its keys
    that ends in ``/`` (a family such as ``hera_mknn/`` for ``hera_mknn/L1H0``)."""
    for method in registered_methods():
        for name in method.log_keys:
            if key == name or (name.endswith("/") and key.startswith(name)):
                return True
    return False


def apply(callbacks: ModuleType) -> None:
    """Patch ``llamafactory.train.callbacks.LogCallback`` (its shape checked by the stage patch, which applies this)."""
    log_callback = callbacks.LogCallback
    if getattr(log_callback, "_llamafactory_hera_patched", False):
        return
    original_on_log = log_callback.on_log
    original_write = log_callback._write_log

    def on_log(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        latest = state.log_history[-1] if state.log_history else {}
        extra = {key: value for key, value in latest.items() if is_method_key(key)}
        if extra and getattr(args, "should_save", True):  # other ranks write no log: keeping theirs would only grow
            self.__dict__.setdefault("_llamafactory_hera_pending", {})[state.global_step] = extra
        return original_on_log(self, args, state, control, **kwargs)

    def _write_log(self: Any, output_dir: str, logs: dict[str, Any]) -> None:
        # training lines, and a method's own lines (e.g. HeRA's alignment monitor at a step that does not log the
        # loss); evaluation and prediction lines at the same step keep the stock keys
        if "loss" in logs or not any(key in logs for key in ("eval_loss", "predict_loss")):
            extra = self.__dict__.get("_llamafactory_hera_pending", {}).pop(logs.get("current_steps"), None)
            if extra:
                logs = {**logs, **extra}
        original_write(self, output_dir, logs)

    log_callback.on_log = on_log
    log_callback._write_log = _write_log
    log_callback._llamafactory_hera_patched = True
