"""Test-only: DeepSpeed does not build its shared-memory op (``deepspeed_shm_comm``) in a process a test starts.

DeepSpeed JIT-compiles it at its first ``init_distributed`` on CPU, while the other ranks wait: 87 CPU s wherever it is
not built for this environment's paths yet (a fresh machine; every checkout's venv rebuilds the one cache folder in
``~/.cache/torch_extensions``). It serves only ``inference_all_reduce`` (DeepSpeed's inference engine); training's
collectives are torch.distributed's either way, so what the ZeRO tests check is unchanged. Imported by the start-up
hooks of the test processes (:mod:`sitecustomize` beside this file, tests/engine_evidence/); a launcher process,
which imports no DeepSpeed, only registers the patch (tests/process_hooks/after_import.py)."""

from after_import import patch_after_import


def _no_shm_op(module) -> None:
    module.build_shm_op = lambda: None


patch_after_import({"deepspeed.comm.torch": _no_shm_op})
