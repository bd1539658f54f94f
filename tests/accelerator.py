"""A simulated accelerator for the tests: real values computed on the CPU, on a device that is not the CPU.

No GPU is reachable from CI, yet every user of the plugin trains on one. This module gives the tests a device
with an accelerator's semantics:

* :class:`OnDevice` is a wrapper tensor that holds a real CPU tensor (``elem``) and reports ``DEVICE`` (``meta``:
  a reported ``cuda`` makes autograd initialise CUDA and abort on a CPU-only torch). Forward and backward run
  with real values.
* :class:`SimulatedAccelerator` is a ``TorchDispatchMode`` that runs every aten op on the CPU and wraps what
  it returns. A factory call with ``device=DEVICE`` (``torch.arange(n, device=x.device)``) makes a device tensor.
  An op that meets a CPU tensor of at least one dimension and a device tensor raises, as CUDA does ("Expected
  all tensors to be on the same device"); excepted, as on CUDA: the indices of ``index`` / ``index_put`` and
  copies between devices.
* Every device-to-host transfer is counted by kind (``item``, ``to host``, ``nonzero``, ``boolean mask``,
  ``repeat_interleave``, ``truth value``, ...) together with the Python frame that asked for it, and every
  host-to-device copy as ``to device``. :meth:`SimulatedAccelerator.syncs` reads the counts.

A model is loaded on the CPU and then moved (``model.to(DEVICE)``), as a GPU load places it.
``torch.inference_mode`` cannot make wrapper tensors; ``torch.no_grad`` places tensors the same way.
safetensors writes device tensors (it copies them to the host first); ``torch.save`` writes their values as CPU
tensors, so ``torch.load`` returns CPU tensors and a restore must move them.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("meta")
aten = torch.ops.aten

_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
             aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
_ALWAYS_SYNC = {
    aten._local_scalar_dense.default: "item",
    aten.is_nonzero.default: "truth value",
    aten.nonzero.default: "nonzero",
    aten.nonzero_static.default: None,  # static output size: no sync
    aten.masked_select.default: "boolean mask",
    aten.equal.default: "equal",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.allclose.default: "allclose",
}


class DeviceMismatch(RuntimeError):
    """A CPU tensor met a tensor on the (simulated) accelerator: CUDA would raise here."""


class OnDevice(torch.Tensor):
    """A tensor on the simulated accelerator: reports ``DEVICE``, holds its real value in ``elem`` (CPU)."""

    elem: torch.Tensor
    __slots__ = ("elem",)

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False) -> OnDevice:
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", (type(elem), elem.device)
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=requires_grad)
        out.elem = elem
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:  # printing must not count as a sync of the code under test
        return f"OnDevice({self.elem!r})"

    def tolist(self) -> Any:  # noqa: D102 - a device-to-host copy, as on CUDA
        return self.cpu().tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - CUDA tensors refuse too
        raise TypeError("can't convert a tensor on the accelerator to numpy; use Tensor.cpu() first")

    def __reduce_ex__(self, protocol: int) -> Any:  # torch.save writes the value as a CPU tensor
        return self.elem.__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        active = SimulatedAccelerator.current
        if active is None:
            raise RuntimeError(f"{func} on a simulated-accelerator tensor outside SimulatedAccelerator")
        return active.run(func, args, kwargs or {})


def _is_device(value: Any) -> bool:
    return type(value) is OnDevice


def _means_device(device: Any) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class _FromData(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` builds its tensor below the dispatcher: build it on the CPU and copy
    it to the device through the dispatcher, which counts the host-to-device copy (as on CUDA, it is one)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _FROM_DATA:
            device = kwargs.get("device")
            if func is torch.Tensor.new_tensor and device is None:
                device = args[0].device
            if _means_device(device):
                out = func(*args, **{**kwargs, "device": torch.device("cpu")})
                if func is torch.Tensor.new_tensor and isinstance(out, OnDevice):
                    return out
                return out.to(DEVICE)
        return func(*args, **kwargs)


class SimulatedAccelerator(TorchDispatchMode):
    """Run real code on the simulated device; count host syncs; raise on a CPU/device mix (see module doc)."""

    current: SimulatedAccelerator | None = None

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.where: list[tuple[str, str]] = []
        self._paused = 0

    # -- public -----------------------------------------------------------------------------------------
    def __enter__(self) -> SimulatedAccelerator:
        self._outer = SimulatedAccelerator.current
        SimulatedAccelerator.current = self
        self._from_data = _FromData()
        self._from_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        SimulatedAccelerator.current = self._outer
        out = super().__exit__(*exc)
        self._from_data.__exit__(*exc)
        return out

    def reset(self) -> None:
        """Forget the syncs counted so far."""
        self.counts.clear()
        self.where.clear()

    def syncs(self, include_copies_to_device: bool = False) -> int:
        """Device-to-host transfers counted since the last :meth:`reset` (plus host-to-device copies if asked)."""
        return sum(n for kind, n in self.counts.items() if include_copies_to_device or kind != "to device")

    def report(self) -> str:
        """One line per counted transfer: kind and the innermost frame of the code under test."""
        return "\n".join(f"{kind}: {frame}" for kind, frame in self.where)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Plain CPU semantics inside (model loading: transformers uses ``meta`` for empty weights)."""
        SimulatedAccelerator.current = self._outer
        with torch.utils._python_dispatch._pop_mode_temporarily() as mode:
            assert mode is self
            try:
                yield
            finally:
                SimulatedAccelerator.current = self

    # -- dispatch -------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return self.run(func, args, kwargs or {})

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        frame = next((f for f in reversed(traceback.extract_stack()[:-3])
                      if "/torch/" not in f.filename and not f.filename.endswith("accelerator.py")), None)
        self.where.append((kind, f"{frame.filename}:{frame.lineno} {frame.name}" if frame else "?"))

    def run(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """Run ``func`` with every device operand replaced by its CPU value; wrap outputs if it ran on the device."""
        flat = _tensors(args, kwargs)
        on_device = any(_is_device(a) for a in flat)
        target = kwargs.get("device")
        if func is aten._to_copy.default:
            return self._copy(args, kwargs)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if _is_device(dst) != _is_device(src):
                self._count("to device" if _is_device(dst) else "to host")
            dst_elem = dst.elem if _is_device(dst) else dst
            dst_elem.copy_(src.elem if _is_device(src) else src, *args[2:], **kwargs)
            return dst
        if not on_device:
            if _means_device(target):  # a factory call placing its result on the accelerator
                out = func(*args, **{**kwargs, "device": torch.device("cpu")})
                return _wrap(out)
            if any(a.device.type == "meta" for a in flat):
                raise RuntimeError(f"{func}: a genuine meta tensor met the simulated accelerator")
            return func(*args, **kwargs)
        self._check_devices(func, args, kwargs, flat)
        self._count_sync(func, args, kwargs)
        out = func(*_map(_unwrap, args), **{k: _unwrap_value(k, v) for k, v in kwargs.items()})
        if not isinstance(out, torch.Tensor | tuple | list):
            return out  # Python scalars and bools land on the host (counted above)
        aliases = {id(a.elem): a for a in flat if _is_device(a)}
        out = _wrap_fresh(out, aliases)
        return _map(lambda v: aliases.get(id(v), v), out)

    def _copy(self, args: Any, kwargs: dict[str, Any]) -> Any:
        """``aten._to_copy``: between devices (counted), or a dtype/layout change on one device."""
        source = args[0]
        device = kwargs.get("device")
        to_device = _means_device(device) if device is not None else _is_device(source)
        out = aten._to_copy.default(_unwrap(source), **{k: v for k, v in kwargs.items() if k != "device"})
        if _is_device(source) != to_device:
            self._count("to device" if to_device else "to host")
        return _wrap(out) if to_device else out

    def _check_devices(self, func: Any, args: Any, kwargs: dict[str, Any], flat: list[torch.Tensor]) -> None:
        if func in _INDEXING:  # CUDA accepts CPU index tensors
            flat = _tensors([args[0], *args[2:]], kwargs)
        cpu = [a for a in flat if type(a) is not OnDevice and a.dim() > 0]
        if cpu:
            raise DeviceMismatch(
                f"Expected all tensors to be on the same device, but found at least two devices, {DEVICE} "
                f"(the simulated accelerator) and cpu! ({func}, CPU operand of shape {tuple(cpu[0].shape)})")

    def _count_sync(self, func: Any, args: Any, kwargs: dict[str, Any]) -> None:
        kind = _ALWAYS_SYNC.get(func)
        if kind:
            self._count(kind)
            return
        if func._overloadpacket is aten.repeat_interleave and kwargs.get("output_size") is None and (
                func is aten.repeat_interleave.Tensor or isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                                    torch.Tensor)):
            self._count("repeat_interleave")
        elif func in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or []):
                self._count("boolean mask")


def _map(fn: Any, value: Any) -> Any:
    """``fn`` applied to every tensor of an op's arguments or outputs (tensors, lists, tuples; the rest as is).

    A hand-written walk: aten arguments nest at most lists of tensors, and pytree's generality cost 2 ms per op.
    """
    kind = type(value)
    if kind is OnDevice or isinstance(value, torch.Tensor):
        return fn(value)
    if kind is tuple or kind is list:
        return kind([_map(fn, v) for v in value])
    if isinstance(value, tuple):  # torch.return_types (structseq) and named tuples
        mapped = [_map(fn, v) for v in value]
        return kind(*mapped) if hasattr(kind, "_make") else kind(mapped)
    return value


def _tensors(args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor among an op's arguments."""
    found: list[torch.Tensor] = []
    _map(found.append, args)
    _map(found.append, list(kwargs.values()))
    return found


def _unwrap(value: Any) -> Any:
    return value.elem if isinstance(value, OnDevice) else value


def _unwrap_value(key: str, value: Any) -> Any:
    if key == "device" and _means_device(value):
        return torch.device("cpu")
    return _map(_unwrap, value)


def _wrap_fresh(out: Any, aliases: dict[int, OnDevice]) -> Any:
    """Wrap outputs; an output that is an operand's own value (in-place and ``out=`` ops) stays that operand."""
    return _map(lambda v: v if id(v) in aliases else _wrap(v), out)


def _wrap(out: Any) -> Any:
    return _map(lambda v: v if isinstance(v, OnDevice) else OnDevice(v), out)


def to_device(tree: Any) -> Any:
    """Copy every tensor of a nested structure to the simulated accelerator (inside the mode)."""
    return _map(lambda v: v.to(DEVICE), tree)


def patch_for_simulated_device(monkeypatch: Any, accelerator: SimulatedAccelerator) -> None:
    """Make the host stack place work on the simulated accelerator, as it places it on a GPU.

    * ``TrainingArguments.device`` and accelerate's device report ``DEVICE``: the Trainer moves the model and
      every batch there (``_move_model_to_device``, ``_prepare_inputs``);
    * LLaMA-Factory's ``get_current_device`` reports it, so ``device_map={"": DEVICE}`` reaches model loading;
    * ``PreTrainedModel.from_pretrained`` loads on the CPU with plain semantics (transformers uses ``meta`` for
      its empty weights) and then moves the model to ``DEVICE`` when the device map names it, as a GPU load
      places it;
    * the fused AdamW the Trainer picks by default accepts the device (its CPU kernel computes).

    Saving works as on a GPU: safetensors copies a non-CPU tensor to the host before writing it.
    """
    import accelerate.state
    import torch.optim.optimizer as optimizer_module
    import transformers

    monkeypatch.setattr(transformers.TrainingArguments, "device",
                        property(lambda self: (self._setup_devices, DEVICE)[1]))

    def keep(self: Any, value: Any) -> None:  # the state's own device, read again once the patch is undone
        self.__dict__["device"] = value

    for state in (accelerate.state.PartialState, accelerate.state.AcceleratorState):
        monkeypatch.setattr(state, "device", property(lambda self: DEVICE, keep), raising=False)
    fused = optimizer_module._get_fused_kernels_supported_devices
    monkeypatch.setattr(optimizer_module, "_get_fused_kernels_supported_devices", lambda: [*fused(), DEVICE.type])

    import importlib

    # Import every module that binds get_current_device by name BEFORE patching: one first imported under the patch
    # would bind the patched function, and monkeypatch would then "restore" it to that (a later CPU run would load
    # its model on the simulated device).
    modules = [importlib.import_module(name) for name in (
        "llamafactory.extras.misc", "llamafactory.hparams.parser", "llamafactory.model.model_utils.quantization",
        "llamafactory.model.model_utils.unsloth", "llamafactory.model.loader", "llamafactory.model.patcher")]
    for module in modules:
        if hasattr(module, "get_current_device"):
            monkeypatch.setattr(module, "get_current_device", lambda: DEVICE)

    load = transformers.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        device_map = kwargs.pop("device_map", None)
        wanted = device_map.get("") if isinstance(device_map, dict) else device_map
        if wanted == "auto":  # inference loading (get_infer_args): on one GPU accelerate's map puts it all there
            wanted = DEVICE
        if wanted is not None and not _means_device(wanted):
            kwargs["device_map"] = device_map
        if SimulatedAccelerator.current is not accelerator:
            return load(cls, *args, **kwargs)
        with accelerator.paused():
            model = load(cls, *args, **kwargs)
        return model.to(DEVICE) if wanted is not None and _means_device(wanted) else model

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that no device set up under the patches outlives them."""
    import accelerate.state

    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


class StepSyncs:
    """A ``TrainerCallback`` counting host syncs per optimizer step, from one step's start to the next's
    (so a step's logging is in it). ``steps`` holds ``(global_step, logged, Counter)``; ``where`` the frames."""

    def __init__(self, accelerator: SimulatedAccelerator) -> None:
        self.accelerator = accelerator
        self.steps: list[tuple[int, bool, Counter[str]]] = []
        self.where: list[str] = []
        self._step = 0

    def _close(self, state: Any, args: Any) -> None:
        if self._step:
            logged = args.logging_steps > 0 and self._step % args.logging_steps == 0
            self.steps.append((self._step, logged, Counter(self.accelerator.counts)))
            self.where.append(self.accelerator.report())
        self.accelerator.reset()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self._close(state, args)
        self._step = state.global_step + 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self._close(state, args)
        self._step = 0

    def __getattr__(self, name: str) -> Any:  # every other callback event: nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
