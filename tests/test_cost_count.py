"""The step counter (llamafactory_hera.plan.counter, used by plan; bench/cost_count.py adds the collectives): one
count against a number worked out by hand, and the bench's own step on a tiny Qwen3-VL through the plugin's HeRA
code path. One process, fake tensors and a fake process group (no collective runs); no reference run is needed: the
references are hand counts."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from llamafactory_hera.plan import counter as cc

BENCH = REPO / "bench"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, str(BENCH))
cx, cm, cost = _bench("cost_count"), _bench("cost_models"), _bench("cost")


@pytest.fixture
def world():
    yield cx.fake_world
    cx.fake_world(1)  # no process group left for the next test


def test_hand_counts_of_a_linear_stack_and_a_gathered_adapter(world) -> None:
    """3 linear layers 64 -> 64 on 8 rows: forward 3 x 2BIO FLOPs, backward the 3 weights' gradients and the 2 inputs'
    that need one (the first layer's input needs none): 8 x 2BIO. A [32, 64] float32 adapter sharded over 4 ranks and
    gathered whole (projection.whole, as HeRA reads a weight under FSDP2) all-gathers 32 x 64 x 4 bytes; its gradient's
    reduction is the all-reduce of the same tensor (Partial("avg")). The storages the step makes: a 8 x 64 float32
    output per layer, live at the forward's end."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from llamafactory_hera.hera.projection import whole

    mesh = world(4)
    batch, width = 8, 64
    with FakeTensorMode():
        stack = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(3)])
        x = torch.empty(batch, width)
        counter = cc.StepCounter(exclude=list(stack.parameters()))
        with FlopCounterMode(display=False) as flops, counter:
            out = stack(x)
            counter.mark()
            out.sum().backward()
        assert flops.get_total_flops() == 8 * 2 * batch * width * width
        assert counter.at_mark >= 3 * batch * width * 4
        adapter = torch.nn.Parameter(distribute_tensor(torch.empty(32, width), mesh, [Shard(0)]))
        counter = cx.CollectiveCounter()
        with counter:
            whole(adapter).sum().backward()
    assert counter.collectives["all-gather"] == 32 * width * 4
    assert cx.local_bytes(adapter) == 32 * width * 4 // 4


TINY = {
    "family": "qwen3_vl", "image_side": 64, "patch": 16,
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True}},
    "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
               "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 16,
               "deepstack_visual_indexes": [1]},
}


@pytest.mark.parametrize("ranks", [1, 2])
def test_bench_step_on_a_tiny_qwen3_vl(world, ranks: int) -> None:
    """The bench's micro-step (bench/cost.py count_arm) on a tiny Qwen3-VL, SFT and HeRA (5 heads in 3 layers, the
    recipe's hera_* keys): the multimodal forward runs under fake tensors (the real-index shim engaged: the vision
    tower's grid and M-RoPE positions are read), HeRA costs more FLOPs than SFT but within 1 %, and under FSDP2 (2
    fake ranks) HeRA gathers more bytes than SFT: its projection's gather of o_proj and the contrastive set's."""
    case = cost.Case("tiny", "qwen3_8b_hera_fsdp2.yaml", TINY, world=ranks,
                     heads=("L13H1", "L7H0", "L3H3", "L13H2", "L13H3"))
    recipe = {"per_device_train_batch_size": 2, "cutoff_len": 32, "lora_rank": 4, "lora_alpha": 8,
              "hera_lambda": 0.01, "hera_k": 1}
    sft, hera = (cost.count_arm(case, recipe, 4, 2, arm) for arm in ("sft", "hera"))
    assert 1.0 < hera["flops"] / sft["flops"] < 1.01
    assert sft["activations"] > 0 and sft["weights"] > 0
    if ranks == 1:
        assert sft["all-gather"] == hera["all-gather"] == 0
    else:
        assert hera["all-gather"] > sft["all-gather"] > 0
        assert sft["reduce-scatter"] > 0
