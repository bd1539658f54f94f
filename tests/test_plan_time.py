"""``llamafactory-hera plan``'s time: the figures it draws from this project's GPU leases against the leases' own
numbers worked by hand, a step as the longest of compute, host and communication, the link a ring over nodes crosses,
the teacher's pass from images per second, every key at training's defaults, fixes that train (text left beside the
image, the fewest GPUs under the engine that fits), and options read wherever they stand on the line. Pure and in
process; the end-to-end ones on the tiny model of tests/test_plan.py (a second each)."""

from __future__ import annotations

import statistics

import pytest
import yaml
from test_plan import COUNTS, GIB, setup, tiny_config, tiny_recipe  # noqa: F401  (tiny_recipe: a fixture)

from llamafactory_hera.cli import main
from llamafactory_hera.plan import cards, estimate, keys, measured, timing

# The leases' numbers as bench/README.md and the issue of the last lease give them (ms per step, medians per run)
H200_LORA = {"sft": (511.1, 481.8, 483.3, 425.7), "hera": (427.7, 567.8, 548.9, 571.0)}
H100_LORA_SFT = (660.6, 725.8)
H200_QLORA = {"sft": (675.7, 656.1), "hera": (611.9, 744.8)}
OPS = {"lora": {"sft": 27_607, "hera": 28_456}, "qlora": {"sft": 28_227, "hera": 29_084}}  # counted a micro-step


def test_the_measured_figures_by_hand() -> None:
    """Host: each run's median step over its counted ops, the spread over the runs of a kind (LoRA: 8 on the H200,
    2 SFT runs on H100s; QLoRA: 4 on an H200). Compute's floor: 89.00 TFLOPs over the fastest step (380 ms on the
    H200) at its 989.4 TFLOP/s. Teacher: 1,000 images in 4.237 s once warm; each cold pass of 128 images less those
    images at that rate is the start."""
    lora = [ms / 1e3 / OPS["lora"][arm] for arm, runs in H200_LORA.items() for ms in runs]
    lora += [ms / 1e3 / OPS["lora"]["sft"] for ms in H100_LORA_SFT]
    got = measured.per_op("lora")
    assert (got.low, got.median, got.high) == pytest.approx((min(lora), statistics.median(lora), max(lora)))
    assert got.low == pytest.approx(427.7e-3 / 28_456) and got.high == pytest.approx(725.8e-3 / 27_607)
    assert "10 LoRA runs on 3 leases" in got.source
    qlora = [ms / 1e3 / OPS["qlora"][arm] for arm, runs in H200_QLORA.items() for ms in runs]
    assert (measured.per_op("qlora").low, measured.per_op("qlora").high) == pytest.approx((min(qlora), max(qlora)))
    share, source = measured.efficiency("lora")
    assert share == pytest.approx(89.00e12 / (989.4e12 * 0.380)) and "H200 lease of 2026-11-28: " in source
    assert measured.efficiency("qlora")[0] == pytest.approx(89.00e12 / (989.4e12 * 0.6119))
    assert measured.teacher_rate() == pytest.approx(1000 / 4.237)
    start = measured.teacher_start()
    assert (start.low, start.high) == pytest.approx((1.35 - 128 * 4.237 / 1000, 1.53 - 128 * 4.237 / 1000))
    assert measured.measured_kind(lora=False, bits=None) == "lora" and measured.measured_kind(True, 4) == "qlora"


def test_a_step_is_the_longest_of_compute_host_and_communication() -> None:
    """A micro-step of few FLOPs and many ops is the host's (its band from the lowest to the highest cost an op); of
    many FLOPs, the compute's (the card's peak to the floor); of many bytes on PCIe, the link's; x accumulation."""
    card = cards.CARDS["H200"]
    peak = 989.4e12
    cost = measured.per_op("lora")
    floor = measured.efficiency("lora")[0]
    run = setup(accumulation=4)
    host = timing.times(1e12, 30_000, run, card, 100, 230)
    assert host["step"] == pytest.approx((4 * 30_000 * cost.low, 4 * 30_000 * cost.high))
    assert host["host"] == pytest.approx(tuple(4 * 30_000 * c for c in (cost.low, cost.median, cost.high)))
    compute = timing.times(1e15, 30_000, run, card, 100, 230)
    assert compute["step"] == pytest.approx((4 * 1e15 / peak, 4 * 1e15 / (peak * floor)))
    link = timing.times(1e12, 0, setup(accumulation=4, gpus=4), cards.CARDS["L40S"], 100, 230, (64e9, 8e9))
    assert link["step"] == pytest.approx((4 * 64e9 / 32e9 + 8e9 / 32e9,) * 2)  # PCIe Gen4: 64 GB/s, 32 each way
    assert compute["tokens/s"] == pytest.approx(tuple(4 * 4 * 230 / s for s in reversed(compute["step"])))


def test_sixteen_gpus_on_nodes_of_eight_cross_the_network() -> None:
    """16 GPUs on nodes of 8 cross the network between 2 nodes: one 400 Gb/s card per node is 50 GB/s each way, so the
    72B FSDP2 recipe's 2,208.6 GB a step take 44.2 s (not NVLink's 4.9 s); 8 cards of 400 Gb/s (400 GB/s) are still
    below NVLink's 450; a node of PCIe cards is slower than the network; 8 GPUs stay on NVLink."""
    h100 = cards.CARDS["H100-SXM"]
    said, rate = timing.link(h100, 16, timing.Network())
    assert rate == 50e9 and said == "the network between 2 nodes (1 x 400 Gb/s per node, 50 GB/s each way)"
    assert 2208.6e9 / rate == pytest.approx(44.17, abs=0.01)
    assert timing.link(h100, 16, timing.Network(8, 8, 400))[1] == 400e9
    assert timing.link(h100, 8, timing.Network()) == ("NVLink 4 (900 GB/s datasheet, half each way)", 450e9)
    pcie = timing.link(cards.CARDS["RTX-4090"], 16, timing.Network(8, 8, 400))
    assert pcie[1] == 32e9 and "slower than the network between 2 nodes" in pcie[0]
    assert timing.link(h100, 16, timing.Network(gpus_per_node=16))[1] == 450e9
    comm = estimate.communicated({**COUNTS, "params": 73.5e9, "trainable": 1.05e8}, setup(engine="fsdp2", gpus=16))
    t = timing.times(1e12, 0, setup(engine="fsdp2", gpus=16, accumulation=8), h100, 1000, 1024, comm)
    assert t["nodes"] == 2 and t["communication"] == pytest.approx(8 * comm[0] / 50e9)


def test_the_teacher_pass_from_images_per_second() -> None:
    """The pass over N images: the measured start (0.81-0.99 s) and N at 236 images/s, the images split over the
    nodes; 128 images is each lease's own pass (1.35-1.53 s), not the 0.05 s its FLOPs would take."""
    assert timing.teacher_pass(128) == pytest.approx((1.35, 1.53))
    rate = 1000 / 4.237
    start = measured.teacher_start()
    assert timing.teacher_pass(10_000, nodes=2) == pytest.approx((start.low + 5000 / rate, start.high + 5000 / rate))


def test_every_key_at_trainings_defaults(tiny_recipe, tmp_path) -> None:  # noqa: F811
    """A HeRA recipe that leaves hera_lambda, the micro-batch and lora_alpha out is read at training's defaults
    (HeRA's parser: hera_lambda 0.01; LLaMA-Factory: a micro-batch of 8, lora_alpha twice lora_rank), and plans."""
    recipe = {**yaml.safe_load(tiny_recipe.read_text()), "stage": "hera", "quantization_bit": None,
              "hera_heads": ["L0H1"], "enable_liger_kernel": False}
    for key in ("per_device_train_batch_size", "lora_alpha"):
        recipe.pop(key, None)
    read = keys.with_defaults(recipe, keys.checked(recipe))
    assert (read["hera_lambda"], read["per_device_train_batch_size"], read["lora_alpha"]) == (0.01, 8, 8)
    assert read["hera_k"] == 10 and read["cutoff_len"] == 32
    path = tmp_path / "hera.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["plan", str(path), "--gpus", "1"]) == 0


def test_a_cutoff_offered_leaves_text_beside_the_image() -> None:
    """The 8B LoRA recipe on a 24 GB card (1,024 tokens, an image of 256): cutoff_len 512 is offered, 256 (no text
    left beside the image) is not; with images of 64 tokens, 256 is."""
    big = {**COUNTS, "params": 8.79e9, "trainable": 2.2e7, "quantizable": 7.5e9, "embedding": 1.25e9, "layer": 2e8,
           "activations": 14 * GIB, "temporaries": 18.5 * GIB}
    card = cards.CARDS["RTX-4090"]
    offered = [" ".join(change) for change, _ in estimate.fixes({"hera": big}, setup(batch=16), card, "hera", 256)]
    assert "cutoff_len=512" in offered and not any("cutoff_len=256" in change for change in offered)
    offered = [" ".join(change) for change, _ in estimate.fixes({"hera": big}, setup(batch=16), card, "hera", 64)]
    assert "cutoff_len=256" in offered


def test_the_fewest_gpus_under_the_engine_that_fits() -> None:
    """A LoRA step that fits 16 GPUs under FSDP2 but not DDP on 16: the fix is FSDP2 on the run's own 16 GPUs (its
    command adds the shipped FSDP2 config), not 32; a full fine-tune moves to ZeRO-3 by its DeepSpeed key."""
    weights = {**COUNTS, "params": 73.5e9, "trainable": 1.05e8, "quantizable": 70e9, "embedding": 1.25e9,
               "layer": 9e8, "activations": 2 * GIB, "temporaries": 2 * GIB}
    card = cards.CARDS["H100-SXM"]
    run = setup(gpus=16)
    assert not card.holds(estimate.memory(weights, run)["needed"])
    assert card.holds(estimate.memory(weights, setup(gpus=16, engine="fsdp2"))["needed"])
    alone = [change for change, _ in estimate.fixes({"hera": weights}, run, card, "hera") if "--gpus" in change[0]]
    assert alone == [("--gpus 16 --accelerate-config recipes/accelerate/fsdp2_config.yaml",)]
    full = estimate.fixes({"hera": {**weights, "trainable": 73.5e9}}, setup(gpus=16, lora=False), card, "hera")
    assert any(change[0].endswith("deepspeed=recipes/deepspeed/ds_z3_config.json") for change, _ in full)


def test_options_anywhere_and_the_fix_lines_plan_what_they_say(tiny_recipe, monkeypatch, capsys) -> None:  # noqa: F811
    """``plan R --gpu X key=value`` reads the key; a fix line the report prints, added to the same command, plans that
    change (here: the halved micro-batch fits the tiny card). The report says its bands, where they come from, the
    link it assumed and tokens per second for the job."""
    monkeypatch.setitem(cards.CARDS, "toy", cards.Card("toy", 100.0, 2 + 2**-14))
    assert main(["plan", str(tiny_recipe), "--gpu", "toy", "cutoff_len=24", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "cutoff_len 24," in out and " on 1 x toy " in out
    fix = next(line.strip() for line in out.splitlines() if line.strip().startswith("per_device_train_batch_size="))
    change = fix.split(":")[0].split()
    assert main(["plan", str(tiny_recipe), "--gpu", "toy", "cutoff_len=24", *change]) == 0
    again = capsys.readouterr().out
    assert "micro-batch 1 x accumulation 4" in again
    assert "the floor the measured steps give (an upper bound; the GPU's busy time was not measured)" in again
    assert "aten ops a micro-step x 21.0-25.6 us an op" in again  # a 4-bit recipe: timed by QLoRA's runs
    assert "4 QLoRA runs on 1 lease: H200 2026-11-26" in again and "tokens/s for the job" in again
    assert main(["plan", str(tiny_recipe), "--gpus", "8", "--gpus-per-node", "4", "--node-link", "2x100"]) == 0
    out = capsys.readouterr().out
    assert ", 2 nodes of 4 (--gpus-per-node)" in out and " per node)" in out
    assert "the network between 2 nodes (2 x 100 Gb/s per node, 25 GB/s each way)" in out
