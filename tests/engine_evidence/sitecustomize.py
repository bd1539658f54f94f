"""Test-only start-up hook: each rank of a subprocess training writes what its engine really is.

Put this folder on ``PYTHONPATH`` and name a folder in ``HERA_TEST_ENGINE_EVIDENCE``: at its first training step
every rank writes ``rank<N>.json`` there with whether DeepSpeed is on, the ZeRO stage its engine runs, the engine's
class, and the first decoder layer's ``o_proj`` weight as the step sees it outside any gather (ZeRO-3 leaves an empty
placeholder with a ``ds_id``). tests/hera/test_hera_deepspeed.py and tests/harc/test_harc_stage.py read it, so ZeRO
losses equal to DDP losses cannot hide a silent fallback to DDP. Without the variable it only hides the unused packages.

The hook patches ``transformers.trainer`` when a process imports it, not at start-up (tests/process_hooks/
after_import.py).

And, as every process a test starts, the run does not see the packages it does not use, nor builds DeepSpeed's
shared-memory op (tests/process_hooks/unused_packages.py and deepspeed_shm.py, which this hook puts on ``sys.path``:
Python runs the first ``sitecustomize`` only).
"""

import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "process_hooks"))
import deepspeed_shm  # noqa: E402, F401 - tests/process_hooks/
import unused_packages  # noqa: E402, F401 - tests/process_hooks/

if os.environ.get("HERA_TEST_ENGINE_EVIDENCE"):
    import json
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
            record.update(o_proj_numel=int(weight.numel()), o_proj_ds_id=getattr(weight, "ds_id", None),
                          o_proj_class=type(getattr(o_proj, "base_layer", o_proj)).__name__)
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

    from after_import import patch_after_import  # tests/process_hooks/

    patch_after_import({"transformers.trainer": _patch_trainer})
