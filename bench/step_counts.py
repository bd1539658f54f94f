"""A method's cost per step in counts that no machine moves: aten ops dispatched and Python calls, against SFT.

``--method hera`` (default) counts the host's whole second optimizer step of three (the first pays one-time imports
and caches) of the real ``run_exp``: from the first step's end to the second's, so its batch's loading and collation
(no dataloader worker: in this process), forward, backward, optimizer step and callbacks; no logging step:

- aten ops: every op dispatched, by a ``TorchDispatchMode`` (recomputations by gradient checkpointing included);
- Python calls: ``sys.setprofile`` call events in the next step, the third (a dispatch mode's own machinery makes
  some 8 Python calls for each op it sees: counted in one step, the ops would be counted twice); and those of them in
  ``torch/utils/checkpoint.py``: the host cost of non-reentrant checkpointing (saved-tensor hooks per tensor).

It runs on a preset of ``assets.py`` (default ``qwen3-vl-8b-smoke``: the GPU preset's architecture shrunk to 8
layers, bf16, 448 px images; ``qwen3-vl-8b-depth``: its 36 layers and 27 vision blocks at the smoke preset's widths)
the recipe of ``overhead.py`` (LoRA on all linear layers, the teacher's features computed before step 1, the alignment
monitor off). Rows: SFT as users run it (LLaMA-Factory's defaults: reentrant checkpointing), SFT with
``use_reentrant_gc: false``, HeRA with the preset's 5 heads; SFT and HeRA again at a larger batch (more images).
``--by-op N``: HeRA's N largest differences from SFT by op and by Python function. The gate (``--check``, asserted by
tests/hera/test_hera_bench.py): HeRA's step makes SFT's checkpoint.py calls (its heads are read out of their
layers' reentrant checkpoint); it adds at most :data:`OPS_LIMIT` aten ops and :data:`CALLS_LIMIT` Python calls, 1 %
of SFT's step at the real depth, and on a ``-depth`` preset at most 1 % of SFT's counts there; its extra ops do not
grow with the batch (at most ``--batch-slack`` more).

``--method harc`` counts one optimizer step from its start to its end, ops and Python calls together (the calls then
include the dispatch mode's own), on a text preset of ``harc.py`` (default ``smoke-8``: Llama architecture, 8
layers), the recipe of ``harc.py`` (LoRA on all linear layers, 12-row micro-batches; SFT on the three role datasets
mixed). Rows: SFT at
LLaMA-Factory's defaults, SFT with ``use_reentrant_gc: false``, HARC (2 coupled layers: ``harc_layers``' default).
HARC's extra ops are named one by one (:data:`HARC_SECTIONS`: its second forward, the KL reference with the adapter
off; the residual capture; each term's forward); the rest is the terms' backward and the loss's sum. The gate
(asserted by tests/harc/test_harc_bench.py): HARC switches no layer's checkpointing (the coupling reads each coupled
layer's own input, which keeps its graph under reentrant checkpointing), so its step makes SFT's checkpoint.py calls
(the KL reference's forward, without grad, makes none); the ops outside the named sections are at most
``HARC_REST_SHARE`` of the named ones (the terms' backward).

Usage: python bench/step_counts.py [--method hera|harc] [--preset PRESET] [--batches 4 16] [--check] [--json FILE]
       [--rows sft hera] [--by-op N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from step_counter import in_section, step_counter  # bench/ is on sys.path: the script's own folder

# HeRA's host work over SFT's per step, the target: 1 % at the real depth (qwen3-vl-8b-depth, batch 8: SFT's whole
# step 28,780 aten ops, 227,056 Python calls); the absolute limits below are that 1 %, which a shallower preset checks
# (HeRA's extra work does not grow with the depth: its heads sit in a fixed number of layers)
HOST_SHARE = 0.01
OPS_LIMIT = 287
CALLS_LIMIT = 2270
HARC_REST_SHARE = 0.5
# the parts of HARC's step named in its ops: (label, module, attribute) of the function whose ops they are
HARC_SECTIONS = (
    ("second forward: the KL reference (adapter off, retain rows)", "llamafactory_hera.harc.trainer",
     "AdapterSwitch.off"),
    ("residual capture (hooks, read)", "llamafactory_hera.harc.residuals", "StepCapture.__call__"),
    ("residual capture (hooks, read)", "llamafactory_hera.harc.residuals", "StepCapture.read"),
    ("coupling terms (forward)", "llamafactory_hera.harc.trainer", "coupling_loss"),
    ("KL term (forward)", "llamafactory_hera.harc.trainer", "kl_to_reference"),
    ("refusal CE term (forward)", "llamafactory_hera.harc.trainer", "refusal_cross_entropy"),
)
def configurations(assets: Any, batches: list[int]) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(key, label, batch, recipe overrides) of every counted run."""
    spread = assets.hera_heads()
    layers = sorted({int(head[1:].split("H")[0]) for head in spread})
    first, rows = batches[0], []
    rows.append(("sft", "SFT (LLaMA-Factory defaults)", first, {"stage": "sft"}))
    rows.append(("sft_nonreentrant", "SFT, use_reentrant_gc: false", first,
                 {"stage": "sft", "use_reentrant_gc": False}))
    rows.append(("hera", f"HeRA ({len(spread)} heads, layers {', '.join(map(str, layers))})", first, {"stage": "hera"}))
    for batch in batches[1:]:
        rows.append((f"sft_b{batch}", "SFT (LLaMA-Factory defaults)", batch, {"stage": "sft"}))
        rows.append((f"hera_b{batch}", f"HeRA ({len(spread)} heads)", batch, {"stage": "hera"}))
    return rows


def count_runs(preset: str, batches: list[int], root: Path, rows: list[str] | None = None,
               by_op: bool = False) -> dict[str, dict[str, Any]]:
    """Every configuration's counts (``rows``: those keys only), in this process: the host's whole second step of
    three (the first pays one-time imports and caches; ``step_counter``'s ``whole``), no logging step among them; at
    the further batches the ops only (their gate), in the second step of two."""
    from assets import build_bench_assets
    from llamafactory.train.tuner import run_exp
    from overhead import recipe

    # the counted steps in one epoch: no dataloader restart in them
    assets = build_bench_assets(root, num_images=max(3 * batches[0], 2 * max(batches)), preset=preset)
    results: dict[str, dict[str, Any]] = {}
    for key, label, batch, overrides in configurations(assets, batches):
        if rows is not None and key not in rows:
            continue
        # k 7 (the GPU command's), below the batch: a batch of k or fewer images would switch HeRA's queue on
        options = argparse.Namespace(batch=batch, epochs=2, device="cpu", precompute="true", monitor=False,
                                     hera_k=min(7, batch - 1), monitor_steps=None, baseline_non_reentrant=False,
                                     quantization_bit=None)
        with tempfile.TemporaryDirectory() as out:
            run = {**recipe(assets, overrides["stage"], out, options), "max_steps": 3 if batch == batches[0] else 2,
                   "logging_steps": 1000, "bf16": True, "use_cpu": True, **overrides}
            counter = step_counter(1, by_op, whole=True, calls=batch == batches[0])
            run_exp(run, callbacks=[counter])
        results[key] = {"label": label, "batch": batch, **asdict(counter.counts)}
        print(f"counted {key}: {results[key]}", flush=True)
    return results


def harc_configurations() -> list[tuple[str, str, dict[str, Any]]]:
    """(key, label, recipe overrides) of every counted HARC run."""
    return [("sft", "SFT (LLaMA-Factory defaults)", {"stage": "sft"}),
            ("sft_nonreentrant", "SFT, use_reentrant_gc: false", {"stage": "sft", "use_reentrant_gc": False}),
            ("harc", "HARC (2 coupled layers)", {"stage": "harc"})]


@contextlib.contextmanager
def harc_sections() -> Iterator[None]:
    """:data:`HARC_SECTIONS` counted by name for the duration."""
    import importlib

    saved = []
    for label, module_name, path in HARC_SECTIONS:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, in_section(label, owner.__dict__[name], context=name == "off"))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def count_harc_runs(preset: str, root: Path) -> dict[str, dict[str, Any]]:
    """Every HARC configuration's counts, in this process (the counted step is the second of each run)."""
    from harc import PRESETS, build_assets, recipe
    from llamafactory.train.tuner import run_exp

    options = argparse.Namespace(steps=2, extract=16, validate=8, refresh_at=100, device="cpu")
    folder = build_assets(root, preset, 64)
    results: dict[str, dict[str, Any]] = {}
    for key, label, overrides in harc_configurations():
        with tempfile.TemporaryDirectory() as out:
            run = {**recipe(folder, overrides["stage"], out, options), "harc_band": 1, **overrides}
            counter = step_counter(1)
            with harc_sections() if overrides["stage"] == "harc" else contextlib.nullcontext():
                run_exp(run, callbacks=[counter])
        results[key] = {"label": label, "batch": 12, "layers": PRESETS[preset][1], **asdict(counter.counts)}
        print(f"counted {key}: {results[key]}", flush=True)
    return results


def harc_gate(results: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    """(statement, holds) of each HARC target."""
    sft, non_reentrant, harc = (results[k] for k in ("sft", "sft_nonreentrant", "harc"))
    every_layer = non_reentrant["checkpoint_calls"] - sft["checkpoint_calls"]
    extra = harc["ops"] - sft["ops"]
    named = sum(harc_parts(results).values())
    return [(f"HARC's step makes {harc['checkpoint_calls']:,} checkpoint.py calls, SFT's {sft['checkpoint_calls']:,} "
             f"(non-reentrant in every layer: {every_layer:+,})", harc["checkpoint_calls"] == sft["checkpoint_calls"]),
            (f"HARC adds {extra:+,} aten ops: {named:,} in its named parts, {extra - named:+,} elsewhere (the "
             f"terms' backward; at most {HARC_REST_SHARE:.0%} of the named: {named * HARC_REST_SHARE:,.0f})",
             extra - named <= named * HARC_REST_SHARE)]


def harc_parts(results: dict[str, dict[str, Any]]) -> dict[str, int]:
    """HARC's extra ops by part: its named sections."""
    return dict(results["harc"]["sections"])


def print_harc_sections(results: dict[str, dict[str, Any]]) -> None:
    parts = harc_parts(results)
    print("\nHARC's extra aten ops, by part of its step")
    for name, ops in parts.items():
        print(f"  {name:62}{ops:9,}")
    rest = results["harc"]["ops"] - results["sft"]["ops"] - sum(parts.values())
    print(f"  {'the rest (the terms backward, the loss sum)':62}{rest:+9,}")


def gate(results: dict[str, dict[str, Any]], batches: list[int], batch_slack: int,
         depth: bool) -> list[tuple[str, bool]]:
    """(statement, holds) of each target; ``depth``: the preset has the real model's depth, where HeRA's host work is
    also held to :data:`HOST_SHARE` of SFT's as a ratio."""
    sft, non_reentrant, hera = (results[k] for k in ("sft", "sft_nonreentrant", "hera"))
    extra_ops, extra_calls = hera["ops"] - sft["ops"], hera["calls"] - sft["calls"]
    every_layer = non_reentrant["checkpoint_calls"] - sft["checkpoint_calls"]
    same = hera["checkpoint_calls"] == sft["checkpoint_calls"]
    checks = [(f"HeRA's step makes {hera['checkpoint_calls']:,} checkpoint.py calls, SFT's {sft['checkpoint_calls']:,} "
               f"(non-reentrant in every layer: {every_layer:+,})", same),
              (f"HeRA adds {extra_ops:+,} aten ops (at most +{OPS_LIMIT})", extra_ops <= OPS_LIMIT),
              (f"HeRA adds {extra_calls:+,} Python calls (at most +{CALLS_LIMIT:,})", extra_calls <= CALLS_LIMIT)]
    if depth:
        for key, what in (("ops", "aten ops"), ("calls", "Python calls")):
            ratio = hera[key] / sft[key]
            checks.append((f"HeRA/SFT {what} at the real depth: {ratio:.4f} (at most {1 + HOST_SHARE:.2f})",
                           ratio <= 1 + HOST_SHARE))
    for batch in batches[1:]:
        grown = results[f"hera_b{batch}"]["ops"] - results[f"sft_b{batch}"]["ops"]
        checks.append((f"HeRA's extra ops at batch {batch}: {grown:+,} against {extra_ops:+,} at batch {batches[0]} "
                       f"(at most {batch_slack} more)", grown - extra_ops <= batch_slack))
    return checks


def print_differences(results: dict[str, dict[str, Any]], base: str, other: str, top: int) -> None:
    """The ``top`` largest differences of ``other`` over ``base`` by aten op and by Python function."""
    for key, what in (("by_op", "aten ops"), ("by_function", "Python calls")):
        a, b = results[base][key], results[other][key]
        deltas = sorted(((b.get(n, 0) - a.get(n, 0), n) for n in set(a) | set(b)), key=lambda d: (-abs(d[0]), d[1]))
        total = sum(d for d, _ in deltas)
        print(f"\n{what}, {other} minus {base}: {total:+,} in all; the {top} largest differences")
        for delta, name in deltas[:top]:
            if delta:
                print(f"  {delta:+8,}  {name}")


def print_table(results: dict[str, dict[str, Any]], preset: str, dtype: str = "bf16") -> None:
    print(f"\nper step, preset {preset}, {dtype}, one optimizer step (the second), real run_exp")
    print(f"{'':44}{'batch':>6}{'aten ops':>11}{'Python calls':>14}{'in checkpoint.py':>18}")
    for row in results.values():
        calls, in_checkpoint = (f"{row[k]:,}" if row["calls"] else "-" for k in ("calls", "checkpoint_calls"))
        print(f"{row['label']:44}{row['batch']:6d}{row['ops']:11,}{calls:>14}{in_checkpoint:>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["hera", "harc"], default="hera")
    parser.add_argument("--preset", help="default: qwen3-vl-8b-smoke (hera), smoke-8 (harc)")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16],
                        help="the first for the main rows; SFT and HeRA again at each further one")
    parser.add_argument("--batch-slack", type=int, default=8,
                        help="how many more ops HeRA may add at a larger batch")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target does not hold")
    parser.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "hera_bench_assets"))
    parser.add_argument("--json", help="also write the counts to this JSON file")
    parser.add_argument("--rows", nargs="+", help="count only these rows (keys: sft, sft_nonreentrant, hera, "
                        "hera_one_layer, sft_bN, hera_bN); --check needs them all")
    parser.add_argument("--by-op", type=int, metavar="N", default=0,
                        help="also print HeRA's N largest differences from SFT by aten op and by Python function")
    args = parser.parse_args()
    if args.method == "harc":
        args.preset = args.preset or "smoke-8"
        results = count_harc_runs(args.preset, Path(args.assets))
        print_table(results, args.preset, "float32")
        print_harc_sections(results)
        checks = harc_gate(results)
    else:
        args.preset = args.preset or "qwen3-vl-8b-smoke"
        results = count_runs(args.preset, args.batches, Path(args.assets), args.rows, args.by_op > 0)
        print_table(results, args.preset)
        if {"sft", "hera"} <= set(results):
            sft, hera = results["sft"], results["hera"]
            print(f"\nHeRA/SFT host work per step: aten ops {hera['ops'] / sft['ops']:.4f}, Python calls "
                  f"{hera['calls'] / sft['calls']:.4f}")
        if args.by_op and {"sft", "hera"} <= set(results):
            print_differences(results, "sft", "hera", args.by_op)
        depth = args.preset.endswith("-depth")
        checks = gate(results, args.batches, args.batch_slack, depth) if args.rows is None else []
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for statement, holds in checks:
        print(f"{'ok  ' if holds else 'FAIL'} {statement}")
    if args.check and not all(holds for _, holds in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
