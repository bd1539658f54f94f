"""Test-only start-up hook: each rank of a subprocess training writes what its engine really is.

Put this folder on ``PYTHONPATH`` and name a folder in ``HERA_TEST_ENGINE_EVIDENCE``: at its first training step
every rank writes ``rank<N>.json`` there with whether DeepSpeed is on, the ZeRO stage its engine runs, the engine's
class, and the first decoder layer's ``o_proj`` weight as the step sees it outside any gather (ZeRO-3 leaves an empty
placeholder with a ``ds_id``). tests/hera/test_hera_deepspeed.py and tests/harc/test_harc_stage.py read it, so ZeRO
losses equal to DDP losses cannot hide a silent fallback to DDP. Without the variable nothing is imported.

The hook patches ``transformers.trainer`` when a process imports it, not at start-up: the ``torchrun`` process of a
run imports no transformers, and importing ``transformers.trainer`` there cost ~10 CPU s per run.

It also keeps DeepSpeed from JIT-compiling its shared-memory communication op (``deepspeed_shm_comm``) at engine
start: on a machine without the compiled op in ``~/.cache/torch_extensions`` (a fresh CI machine) the build took 87
CPU s while the other ranks waited. DeepSpeed uses that op only in ``inference_all_reduce`` (its inference engine);
training's collectives are torch.distributed's either way, so what the ZeRO tests check is unchanged.

And, as every training process a test starts, the run does not see the eval extra's wandb and scikit-learn
(tests/without_eval_extra/, on ``PYTHONPATH`` after this folder: Python runs the first ``sitecustomize`` only).
"""

import contextlib
import os

with contextlib.suppress(ImportError):  # tests/without_eval_extra/ is on PYTHONPATH in the tests' processes
    import eval_extra_hidden  # noqa: F401

if os.environ.get("HERA_TEST_ENGINE_EVIDENCE"):
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import json
    import sys
    from pathlib import Path

    def _evidence(trainer, model) -> dict:
        plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
        engine_stage = getattr(model, "zero_optimization_stage", None)
        record = {"is_deepspeed_enabled": bool(getattr(trainer, "is_deepspeed_enabled", False)),
                  "plugin_zero_stage": getattr(plugin, "zero_stage", None),
                  "engine": type(model).__name__,
                  "engine_zero_stage": engine_stage() if callable(engine_stage) else None}
        try:
            from llamafactory_hera.heads.architecture import head_projections

            o_proj = head_projections(trainer.model)[0]
            weight = getattr(o_proj, "base_layer", o_proj).weight
            record.update(o_proj_numel=int(weight.numel()), o_proj_ds_id=getattr(weight, "ds_id", None))
        except Exception as error:  # noqa: BLE001 - recorded, the test says what is missing
            record["o_proj_error"] = repr(error)
        return record

    def _patch_trainer(module) -> None:
        original_step = module.Trainer.training_step

        def training_step(self, model, inputs, *args, **kwargs):
            if not getattr(self, "_hera_test_evidence_written", False):
                self._hera_test_evidence_written = True
                folder = Path(os.environ["HERA_TEST_ENGINE_EVIDENCE"])
                folder.mkdir(parents=True, exist_ok=True)
                rank = int(os.environ.get("RANK", "0"))
                (folder / f"rank{rank}.json").write_text(json.dumps(_evidence(self, model)), encoding="utf-8")
            return original_step(self, model, inputs, *args, **kwargs)

        module.Trainer.training_step = training_step

    def _patch_deepspeed_comm(module) -> None:
        module.build_shm_op = lambda: None

    PATCHES = {"transformers.trainer": _patch_trainer, "deepspeed.comm.torch": _patch_deepspeed_comm}

    class _AfterImport(importlib.abc.MetaPathFinder):
        """Finds the modules of ``PATCHES`` through the other finders, and patches each once it has executed."""

        def find_spec(self, fullname, path=None, target=None):
            if fullname not in PATCHES:
                return None
            sys.meta_path.remove(self)  # the real spec, from the finders after this one
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None:
                execute = spec.loader.exec_module  # this module's own loader object: patched for it alone

                def exec_module(module, execute=execute, patch=PATCHES[fullname]):
                    execute(module)
                    patch(module)

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterImport())
