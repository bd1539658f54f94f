"""The simulated accelerator itself: real values, CUDA's device rules, host syncs counted.

Each rule below is what CUDA does; a test that runs plugin code on this device relies on all of them.
"""

from __future__ import annotations

import io

import pytest
import torch

from llamafactory_hera_testing.accelerator import DEVICE, DeviceMismatch, OnDevice, SimulatedAccelerator
from llamafactory_hera_testing.accelerator_run import StepSyncs

pytestmark = pytest.mark.accelerator


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU(), torch.nn.Linear(3, 2))


def test_forward_backward_and_optimizer_values_equal_the_cpu() -> None:
    """Loss, gradients and an AdamW step on the device equal the same computation on the CPU (bit for bit)."""
    x = torch.randn(5, 4)
    cpu = _model()
    cpu_loss = cpu(x).square().sum()
    cpu_loss.backward()
    torch.optim.AdamW(cpu.parameters(), lr=0.1).step()
    with SimulatedAccelerator():
        model = _model().to(DEVICE)
        assert all(isinstance(p, OnDevice) and p.device == DEVICE for p in model.parameters())
        loss = model(x.to(DEVICE)).square().sum()
        loss.backward()
        assert isinstance(model[0].weight.grad, OnDevice)
        torch.optim.AdamW(model.parameters(), lr=0.1).step()
        assert torch.equal(loss.cpu(), cpu_loss.detach())
        for mine, theirs in zip(model.parameters(), cpu.parameters(), strict=True):
            assert torch.equal(mine.detach().cpu(), theirs.detach())


@pytest.mark.parametrize("mix", [
    lambda d, c: d + c, lambda d, c: torch.cat([d, c]), lambda d, c: d @ c.T, lambda d, c: torch.where(d > 0, d, c),
    lambda d, c: d.index_select(0, torch.tensor([0, 1])),
], ids=["add", "cat", "matmul", "where", "index_select"])
def test_a_cpu_tensor_meeting_a_device_tensor_raises(mix) -> None:
    """As on CUDA: "Expected all tensors to be on the same device"."""
    with SimulatedAccelerator():
        on_device = torch.randn(3, 4, device=DEVICE)
        with pytest.raises(DeviceMismatch, match="same device"):
            mix(on_device, torch.randn(3, 4))


def test_what_cuda_accepts_from_the_cpu() -> None:
    """CPU index tensors in indexing, 0-dim CPU scalars, and explicit copies are accepted, as on CUDA."""
    with SimulatedAccelerator():
        x = torch.arange(12.0, device=DEVICE).view(3, 4)
        assert isinstance(x, OnDevice)
        assert torch.equal(x[torch.tensor([2, 0])].cpu(), torch.arange(12.0).view(3, 4)[[2, 0]])
        assert torch.equal((x * torch.tensor(2.0)).cpu(), torch.arange(12.0).view(3, 4) * 2)
        y = torch.zeros(3, 4, device=DEVICE)
        y.copy_(torch.ones(3, 4))
        assert torch.equal(y.cpu(), torch.ones(3, 4))


@pytest.mark.parametrize("code,kind", [
    ("float(x.sum())", "item"), ("x.sum().item()", "item"), ("x.tolist()", "to host"), ("x.cpu()", "to host"),
    ("torch.nonzero(x > 0)", "nonzero"), ("x[x > 0]", "boolean mask"),
    ("torch.masked_select(x, x > 0)", "boolean mask"), ("x.repeat_interleave(r, dim=0)", "repeat_interleave"),
    ("bool((x > 0).any())", "item"), ("torch.unique(x)", "unique"),
    ("torch.tensor([1, 2], device=x.device)", "to device"), ("torch.ones(2).to(x.device)", "to device"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None)
def test_host_syncs_are_counted_by_kind(code: str, kind: str) -> None:
    """Every device-to-host transfer (and host-to-device copy) is counted once, with its kind and frame."""
    with SimulatedAccelerator() as accelerator:
        names = {"torch": torch, "x": torch.randn(3, 4, device=DEVICE), "r": torch.tensor([1, 2, 1], device=DEVICE)}
        accelerator.reset()
        eval(code, names)
        assert accelerator.counts[kind] >= 1, accelerator.counts
        assert sum(accelerator.counts.values()) == accelerator.counts[kind], accelerator.counts
        assert accelerator.report().startswith(f"{kind}: <string>:1")  # the frame that asked (here: eval's)


def test_no_sync_for_device_only_work() -> None:
    """Arithmetic, reductions to tensors, ``repeat_interleave`` with ``output_size`` and device factories: none."""
    with SimulatedAccelerator() as accelerator:
        x = torch.randn(3, 4, device=DEVICE)
        repeats = torch.tensor([1, 2, 1], device=x.device)
        accelerator.reset()
        y = (x.softmax(-1) @ x.T).sum(0) + torch.arange(3, device=x.device)
        x.repeat_interleave(repeats, dim=0, output_size=4)
        torch.where(x > 0, x, torch.zeros_like(x)).mean()
        assert isinstance(y, OnDevice)
        assert accelerator.syncs(include_copies_to_device=True) == 0, accelerator.report()


def test_saved_tensors_load_on_the_cpu() -> None:
    """``torch.save`` writes a device tensor's value; it loads as a CPU tensor (a restore must move it)."""
    with SimulatedAccelerator():
        x = torch.randn(3, device=DEVICE)
        buffer = io.BytesIO()
        torch.save({"x": x}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer)["x"]
        assert type(loaded) is torch.Tensor and loaded.device.type == "cpu"
        assert torch.equal(loaded, x.cpu())


def test_step_syncs_counts_per_step() -> None:
    """StepSyncs closes a step's count at the next step's start and at the end of training."""
    from types import SimpleNamespace

    with SimulatedAccelerator() as accelerator:
        counter = StepSyncs(accelerator)
        args = SimpleNamespace(logging_steps=2)
        x = torch.randn(3, device=DEVICE)
        for step in range(3):
            counter.on_step_begin(args, SimpleNamespace(global_step=step), None)
            for _ in range(step + 1):
                x.sum().item()
        counter.on_train_end(args, None, None)
    assert [(step, logged, counts["item"]) for step, logged, counts in counter.steps] == [
        (1, False, 1), (2, True, 2), (3, False, 3)]


def test_step_syncs_say_where_in_the_step_each_wait_falls() -> None:
    """Each wait with the ops run in its step up to it, itself included: ``x + 1``, ``sum``, then ``item`` (the
    third); a host tensor made and copied to the device (no wait), ``x > 0``, ``all``, and the truth value, an
    ``item`` too (the eighth)."""
    from types import SimpleNamespace

    with SimulatedAccelerator() as accelerator:
        counter = StepSyncs(accelerator)
        args = SimpleNamespace(logging_steps=0)
        x = torch.randn(3, device=DEVICE)
        counter.on_step_begin(args, SimpleNamespace(global_step=0), None)
        (x + 1).sum().item()
        torch.ones(2).to(DEVICE)
        bool((x > 0).all())
        counter.on_train_end(args, None, None)
    (waits,) = counter.waits
    assert [(kind, ops) for kind, ops, _ in waits] == [("item", 3), ("item", 8)], waits
    assert counter.ops == [8] and all("test_accelerator_sim.py" in frame for _, _, frame in waits), waits


def test_a_cpu_run_after_a_device_run_is_on_the_cpu(assets, tmp_path) -> None:
    """Nothing of the simulated device outlives its patches: a CPU run_exp after one on the device loads and trains
    on the CPU. Failed before with "Cannot copy out of meta tensor" when LLaMA-Factory's parser was first imported
    under the patch (it binds get_current_device by name)."""
    import llamafactory.hparams.parser
    from llamafactory.train.tuner import run_exp

    from conftest import base_recipe
    from llamafactory_hera_testing.accelerator_run import patch_for_simulated_device, reset_accelerate_state

    recipe = {k: v for k, v in base_recipe(assets, "qwen2_5_vl", tmp_path / "device", max_steps=1).items()
              if not k.startswith("hera_")} | {"stage": "sft", "save_strategy": "no"}
    with pytest.MonkeyPatch.context() as monkeypatch:
        reset_accelerate_state()
        accelerator = SimulatedAccelerator()
        patch_for_simulated_device(monkeypatch, accelerator)
        with accelerator:
            run_exp(recipe)
    reset_accelerate_state()
    assert llamafactory.hparams.parser.get_current_device().type == "cpu"
    run_exp(recipe | {"output_dir": str(tmp_path / "cpu")})
    assert (tmp_path / "cpu" / "trainer_state.json").is_file()
