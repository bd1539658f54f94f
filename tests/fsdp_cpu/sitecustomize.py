"""Test-only start-up hook: ``accelerate launch`` with an FSDP config really shards on CPU, and each rank says so.

accelerate 1.11 keeps FSDP only for accelerator process groups: on CPU an FSDP config trains plain DDP over gloo
without a word, though torch's ``fully_shard`` itself runs on gloo. With ``HERA_TEST_FSDP_ON_CPU`` set (read when each
AcceleratorState is made, so several runs in one launch can switch it), this hook turns FSDP back on where accelerate
dropped it, on AcceleratorState and on PartialState's shared state: every later ``AcceleratorState()`` copies
PartialState's ``MULTI_CPU`` back (accelerate/state.py, ``__init__``), so patching the first alone falls back to DDP
by save time. What accelerate does for an FSDP state it does here too: the config's mixed precision becomes FSDP2's
MixedPrecisionPolicy; with ``fsdp_offload_params: true`` the CPUOffloadPolicy keeps the shards in unpinned host
memory (pinning needs a CUDA driver).

With ``HERA_TEST_FSDP_EVIDENCE`` naming a folder, every rank appends one JSON line per event to ``rank<N>.jsonl``
there: at each training step, at each checkpoint save and after a checkpoint is loaded, the distributed type, the
FSDP version, the mixed-precision dtype and host offload that fully_shard holds for the parameters, and how many
trainable parameters (and which o_proj weight) are DTensors, with their local and full sizes, so a silent fallback to
DDP fails the test that reads it (tests/fsdp_checks.py). Put this folder on ``PYTHONPATH``; without the variables it
only hides, as in every process a test starts, the packages the run does not use
(tests/process_hooks/unused_packages.py, which it puts on ``sys.path``: Python runs the first ``sitecustomize``).
"""

import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "process_hooks"))
import unused_packages  # noqa: E402, F401 - tests/process_hooks/

if os.environ.get("HERA_TEST_FSDP_ON_CPU") or os.environ.get("HERA_TEST_FSDP_EVIDENCE"):
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy

    _original_init = AcceleratorState.__init__

    def _init(self, *args, fsdp_plugin=None, **kwargs):
        _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # read at each state's making: several runs in one launch (tests/dist_probe.py) switch it per run
        if os.environ.get("HERA_TEST_FSDP_ON_CPU") and fsdp_plugin is not None \
                and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # what accelerate does for an FSDP state (state.py, __init__)
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy):  # fsdp_offload_params: true
                # accelerate's policy pins the shards' host memory, which needs a CUDA driver: unpinned here
                fsdp_plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)

    AcceleratorState.__init__ = _init

if os.environ.get("HERA_TEST_FSDP_EVIDENCE"):
    import json
    from pathlib import Path

    from after_import import patch_after_import  # tests/process_hooks/: the launcher imports no transformers

    def _applied(model) -> dict:
        """The policies ``fully_shard`` holds for the first sharded module with parameters (accelerate gives every
        module the same; not what the plugin was told): its mixed-precision dtype and whether its parameters are
        offloaded to host memory."""
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
            if group is not None:
                return {"param_dtype": str(group.mp_policy.param_dtype),
                        "offload_to_cpu": all(param.offload_to_cpu for param in group.fsdp_params)}
        return {"param_dtype": None, "offload_to_cpu": None}

    def _evidence(trainer, event: str) -> None:
        from accelerate.state import PartialState
        from torch.distributed.tensor import DTensor

        state = trainer.accelerator.state
        plugin = getattr(state, "fsdp_plugin", None)
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        record = {"event": event, "step": int(trainer.state.global_step),
                  "distributed_type": str(state.distributed_type),
                  "partial_distributed_type": str(PartialState().distributed_type),
                  "fsdp_version": getattr(plugin, "fsdp_version", None),
                  "is_fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)),
                  **_applied(trainer.model),
                  "trainable": len(trainable),
                  "trainable_dtensors": sum(isinstance(p, DTensor) for p in trainable)}
        try:
            from llamafactory_hera.heads.architecture import head_projections

            o_proj = head_projections(trainer.model)[0]
            base = getattr(o_proj, "base_layer", o_proj)  # nn.Linear, or bitsandbytes' Linear4bit under QLoRA
            weight = base.weight
            record.update(o_proj_class=type(base).__name__, o_proj_dtype=str(weight.dtype),
                          o_proj_dtensor=isinstance(weight, DTensor),
                          o_proj_local=list(weight.to_local().shape if isinstance(weight, DTensor) else weight.shape),
                          o_proj_full=list(weight.shape))
        except Exception as error:  # noqa: BLE001 - recorded, the test says what is missing
            record["o_proj_error"] = repr(error)
        _packed_evidence(trainer, record)
        folder = Path(os.environ["HERA_TEST_FSDP_EVIDENCE"])
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{os.environ.get('RANK', '0')}.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def _packed_bytes(model, param_dtype=None) -> dict:
        """name -> the bytes of each bitsandbytes 4-bit layer's packed weight, gathered whole and cast to the
        all-gather's ``param_dtype`` as FSDP2 casts it for the forward (a collective under FSDP2)."""
        import torch
        from torch.distributed.tensor import DTensor

        bitsandbytes = sys.modules.get("bitsandbytes")  # not imported: no 4-bit layer
        found = {}
        for name, module in model.named_modules():
            # bitsandbytes' own layer, not PEFT's LoRA wrapper of one, which shares its class name
            if bitsandbytes is not None and isinstance(module, bitsandbytes.nn.Linear4bit):
                weight = module.weight.full_tensor() if isinstance(module.weight, DTensor) else module.weight.data
                if param_dtype is not None:
                    weight = weight.to(param_dtype)
                found[name] = weight.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
        return found

    def _packed_evidence(trainer, record: dict) -> None:
        """At the first step: how many 4-bit layers' codes, as FSDP2's all-gather hands them to the forward, differ
        from those the trainer was given (before accelerate prepared the model)."""
        import torch

        given = getattr(trainer, "_hera_test_packed", None)
        if not given or record["step"] != 0 or record["event"] != "step":
            return
        named = str(record.get("param_dtype"))  # "torch.bfloat16", or "None" without mixed precision
        param_dtype = getattr(torch, named.split(".")[-1]) if named.startswith("torch.") else None
        gathered = _packed_bytes(trainer.model, param_dtype)
        record.update(packed_layers=len(given),
                      packed_changed=sum(gathered.get(name) != codes for name, codes in given.items()))

    def _patch_trainer(module) -> None:
        Trainer = module.Trainer
        _init, _step = Trainer.__init__, Trainer.training_step
        _save, _load = Trainer._save_checkpoint, Trainer._load_from_checkpoint

        def __init__(self, *args, **kwargs):
            _init(self, *args, **kwargs)
            self._hera_test_packed = _packed_bytes(self.model)  # before accelerate prepares the model

        def training_step(self, *args, **kwargs):
            _evidence(self, "step")
            return _step(self, *args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            _evidence(self, "save")
            return _save(self, *args, **kwargs)

        def _load_from_checkpoint(self, *args, **kwargs):
            result = _load(self, *args, **kwargs)
            _evidence(self, "load")
            return result

        Trainer.__init__, Trainer.training_step, Trainer._save_checkpoint, Trainer._load_from_checkpoint = (
            __init__, training_step, _save_checkpoint, _load_from_checkpoint)

    patch_after_import({"transformers.trainer": _patch_trainer})
