"""The start-up hooks of the processes tests start keep DeepSpeed from building its shared-memory op
(tests/process_hooks/deepspeed_shm.py): in-process, no launch."""

from __future__ import annotations

import runpy

import pytest

from conftest import PROCESS_HOOKS

HOOKS = (PROCESS_HOOKS / "sitecustomize.py", PROCESS_HOOKS.parent / "engine_evidence" / "sitecustomize.py")


def test_a_test_process_builds_no_deepspeed_shm_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once DeepSpeed's comm backend is imported, ``build_shm_op`` returns None without building (87 CPU s where the
    op is not built for this environment yet); both start-up hooks that see DeepSpeed import the patch."""
    comm = pytest.importorskip("deepspeed.comm.torch")
    original = comm.build_shm_op
    monkeypatch.setattr(comm, "build_shm_op", original)  # put back after the test
    monkeypatch.syspath_prepend(str(PROCESS_HOOKS))
    runpy.run_path(str(PROCESS_HOOKS / "deepspeed_shm.py"))
    assert comm.build_shm_op is not original and comm.build_shm_op() is None
    for hook in HOOKS:
        assert "\nimport deepspeed_shm  #" in hook.read_text(encoding="utf-8"), hook
