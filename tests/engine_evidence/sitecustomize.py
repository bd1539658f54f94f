"""Test-only start-up hook: each rank of a subprocess training writes what its engine really is.

Put this folder on ``PYTHONPATH`` and name a folder in ``HERA_TEST_ENGINE_EVIDENCE``: at its first training step
every rank writes ``rank<N>.json`` there with whether DeepSpeed is on, the ZeRO stage its engine runs, the engine's
class, and the first decoder layer's ``o_proj`` weight as the step sees it outside any gather (ZeRO-3 leaves an empty
placeholder with a ``ds_id``). tests/hera/test_hera_deepspeed.py and tests/harc/test_harc_stage.py read it, so ZeRO
losses equal to DDP losses cannot hide a silent fallback to DDP. Without the variable nothing is imported.
"""

import os

if os.environ.get("HERA_TEST_ENGINE_EVIDENCE"):
    import json
    from pathlib import Path

    import transformers.trainer

    _original_step = transformers.trainer.Trainer.training_step

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

    def training_step(self, model, inputs, *args, **kwargs):
        if not getattr(self, "_hera_test_evidence_written", False):
            self._hera_test_evidence_written = True
            folder = Path(os.environ["HERA_TEST_ENGINE_EVIDENCE"])
            folder.mkdir(parents=True, exist_ok=True)
            rank = int(os.environ.get("RANK", "0"))
            (folder / f"rank{rank}.json").write_text(json.dumps(_evidence(self, model)), encoding="utf-8")
        return _original_step(self, model, inputs, *args, **kwargs)

    transformers.trainer.Trainer.training_step = training_step
