"""Stock ``stage: sft`` on two gloo ranks, with the plugin live and with ``LLAMAFACTORY_HERA_DISABLE=1`` (what the
start-up hook does when the plugin is uninstalled: nothing is patched), under DDP and FSDP2 (``FULL_STATE_DICT`` and
``SHARDED_STATE_DICT``), each run saving a checkpoint at both of its two steps, and FSDP2's resumed from step 1 across
the switch both ways.

Three ``accelerate launch --config_file`` launches of LLaMA-Factory's fsdp2_config.yaml on CPU (tests/fsdp_checks.py;
its test-only shim turns FSDP2 on per run, ``ACCELERATE_USE_FSDP=false`` makes a run plain DDP: accelerate launch's
multi-CPU ranks are torchrun's), the runs one after another in each (tests/dist_probe.py): live, then disabled, then
live. The first live launch's ranks are forked from the worker's warm process with the variables accelerate gives them
(tests/warm_launch.py, which a disabled plugin cannot use: the warm process imported it); the other two are real
``accelerate launch`` processes, the second with a DDP run of its own, so each engine is also seen live under the real
launcher. What stays as without the
plugin: the files each run writes, its losses, its final adapter and the tensors of its checkpoints, bit for bit; the
sharded checkpoints resume across the switch as stock resumes its own. (A DDP resume fails on CPU under accelerate
launch in stock alone: transformers loads the optimizer with ``map_location`` cpu:0; its checkpoints are the same
tensors either way.) What differs: FSDP2's ``pytorch_model_fsdp.bin`` (FULL_STATE_DICT) holds the whole adapter with the
plugin, rank 0's shards without (engines/fsdp_adapter.py), and the sharded run's one warning line. Across the switch
such a file is refused: the plugin's by stock's own ``load_state_dict`` check, stock's by the plugin, which alone cannot
restore it (stock's own resume from it continues with the other rank's half of the adapter reset).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from dist_runs import PROBE, warm_script
from fsdp_checks import _launch, assert_fsdp2, fsdp2_config_file, read_fsdp_evidence
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import base_recipe, offline_env, read_trainer_log, run_once_more_if_aborted_at_exit
from llamafactory_hera_testing.resume import assert_resumed_equals_whole, differences

ENGINE_ENV = {"ddp": {"ACCELERATE_USE_FSDP": "false"}, "full": {"HERA_TEST_FSDP_ON_CPU": "1"},
           "sharded": {"HERA_TEST_FSDP_ON_CPU": "1", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}}
WARNING = ("[llamafactory-hera] warning: ACCELERATE_USE_FSDP=true (FSDP_VERSION=2), set by accelerate launch with an "
           "FSDP config, FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT: stage: sft saves only resumable sharded checkpoints "
           "(checkpoint-N/pytorch_model_fsdp_0/), no adapter or model")
CHECKPOINT_TENSORS = ("adapter_model.safetensors", "optimizer.pt", "optimizer.bin", "scheduler.pt")
REFUSED = "resume_from_checkpoint: the FSDP2 checkpoint's pytorch_model_fsdp.bin holds an adapter saved without"


def _run(assets: Any, root: Path, engine: str, name: str, resume: str | None = None) -> dict[str, Any]:
    """A run of the plain sft recipe (no key of the plugin's) into ``root/engine/name``, resumed from ``resume``'s
    checkpoint-1 when given."""
    folder = root / engine / name
    recipe = {k: v for k, v in base_recipe(assets, "qwen2_5_vl", folder / "out", per_device_train_batch_size=4,
                                           max_steps=2, save_strategy="steps", save_steps=1).items()
              if not k.startswith("hera_")} | {"stage": "sft"}
    if resume:
        recipe["resume_from_checkpoint"] = str(root / engine / resume / "out" / "checkpoint-1")
    return {"recipe": recipe, "env": {**ENGINE_ENV[engine], "HERA_TEST_FSDP_EVIDENCE": str(folder / "fsdp")}}


def _launch_runs(runs: list[dict[str, Any]], tmp: Path, disabled: bool, warm: bool = False) -> Any:
    """The runs in one launch (live, or ``disabled``; ``warm``: forked from the warm process); its process (the last
    run may fail)."""
    tmp.mkdir(parents=True)
    (tmp / "runs.json").write_text(json.dumps(runs))
    launcher, env = _launch(fsdp2_config_file(tmp), tmp)
    env |= {"PYTHONUNBUFFERED": "1", **({"LLAMAFACTORY_HERA_DISABLE": "1"} if disabled else {})}
    args, options = [str(tmp / "runs.json"), str(tmp / "out.pt")], dict(cwd=tmp, env=offline_env(tmp, **env),
                                                                         timeout=240 * len(runs))
    if warm:
        proc = warm_script(PROBE, args, 2, launcher[2:], **options)
    else:
        proc = run_once_more_if_aborted_at_exit([*launcher, PROBE, *args], options, lambda: None, tries=1)
    (tmp / "output.txt").write_text(proc.stdout + proc.stderr, encoding="utf-8")  # what a failed assertion omits
    return proc


def _tensors(path: Path) -> Any:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=False)


def _written(out: Path) -> set[str]:
    return {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()}


def _sharded(checkpoint: Path, tmp: Path) -> dict[str, Any]:
    """A sharded checkpoint's model and optimizer, whole (torch's converter, in this process)."""
    found = {}
    tmp.mkdir(parents=True)
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        dcp_to_torch_save(checkpoint / part, tmp / f"{part}.pt")
        found[part] = torch.load(tmp / f"{part}.pt", weights_only=False)
    return found


def _shards_in(path: Path) -> bool:
    """Whether a torch.save file holds DTensors (read from its pickle: loading one needs a process group)."""
    with zipfile.ZipFile(path) as archive:
        return b"DTensor" in archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


def _losses(out: Path) -> list[float]:
    return [line["loss"] for line in read_trainer_log(out) if "loss" in line]


def test_stock_sft_runs_saves_and_resumes_as_without_the_plugin(assets, tmp_path: Path) -> None:
    root = tmp_path
    engines = list(ENGINE_ENV)
    live = _launch_runs([_run(assets, root, engine, "live") for engine in engines], root / "launch_live", False,
                        warm=True)
    assert live.returncode == 0, live.stderr[-5000:]
    disabled = _launch_runs([*(_run(assets, root, engine, "off") for engine in engines),
                             _run(assets, root, "sharded", "live_off", "live"),
                             *(_run(assets, root, engine, "off_off", "off") for engine in ("sharded", "full")),
                             _run(assets, root, "full", "live_off", "live")], root / "launch_off", True)
    again = _launch_runs([_run(assets, root, "ddp", "live_real"),  # DDP live under the real launcher too
                          _run(assets, root, "sharded", "off_live", "off"),
                          _run(assets, root, "full", "live_live", "live"),
                          _run(assets, root, "full", "off_live", "off")], root / "launch_again", False)
    out = {f"{engine}/{name}": root / engine / name / "out" for engine in engines for name in
           ("live", "off", "live_off", "off_live", "live_live", "off_off", "live_real")}

    # both launches ran each engine: DDP without a DTensor, FSDP2 sharding every trainable parameter and o_proj
    for name in ("live", "off"):
        assert {(r["distributed_type"], r["trainable_dtensors"]) for r in read_fsdp_evidence(root / "ddp" / name)} \
            == {("DistributedType.MULTI_CPU", 0)}
        for engine in ("full", "sharded"):
            assert_fsdp2(root / engine / name, {"step", "save"})
    # the same files, losses, final adapter (DDP, FULL) and sharded checkpoints; the plugin adds no file of its own
    for engine in engines:
        assert _written(out[f"{engine}/live"]) == _written(out[f"{engine}/off"]), engine
        assert not {"llamafactory_hera_run.json", "llamafactory_hera_claim.json"} & _written(out[f"{engine}/live"])
        assert _losses(out[f"{engine}/live"]) == _losses(out[f"{engine}/off"]), engine
        assert len(_losses(out[f"{engine}/off"])) == 2, engine
    assert _written(out["ddp/live_real"]) == _written(out["ddp/off"])  # the real accelerate launch's DDP run
    assert _losses(out["ddp/live_real"]) == _losses(out["ddp/off"])
    assert not differences(*(_tensors(out[f"ddp/{run}"] / "adapter_model.safetensors") for run in ("off", "live_real")))
    for engine in ("ddp", "full"):
        for path in ("", "checkpoint-1/", "checkpoint-2/"):
            for name in CHECKPOINT_TENSORS if path else CHECKPOINT_TENSORS[:1]:
                if (out[f"{engine}/off"] / path / name).is_file():
                    want, got = (_tensors(out[f"{engine}/{run}"] / path / name) for run in ("off", "live"))
                    assert not differences(want, got), (engine, path, name)
    assert not (out["sharded/live"] / "adapter_model.safetensors").exists()
    for step in (1, 2):
        checkpoints = [out[f"sharded/{name}"] / f"checkpoint-{step}" for name in ("off", "live")]
        assert not differences(*(_sharded(c, tmp_path / f"{i}-{step}") for i, c in enumerate(checkpoints)))
    # each sharded run's warning, once (rank 0), with the plugin only
    assert live.stdout.count(WARNING) == again.stdout.count(WARNING) == 1 and WARNING not in disabled.stdout
    # FULL_STATE_DICT's resume copy: the whole adapter with the plugin, rank 0's shards without
    assert not _shards_in(out["full/live"] / "checkpoint-1" / "pytorch_model_fsdp.bin")
    assert _shards_in(out["full/off"] / "checkpoint-1" / "pytorch_model_fsdp.bin")

    # resumed across the switch, both ways: the sharded checkpoints end as stock's own resume (which restores the
    # model, not the optimizer's state: not the run not stopped, with or without the plugin)
    stock = _sharded(out["sharded/off_off"] / "checkpoint-2", tmp_path / "off_off")
    for direction in ("live_off", "off_live"):
        assert not differences(stock, _sharded(out[f"sharded/{direction}"] / "checkpoint-2", tmp_path / direction))
        assert _losses(out[f"sharded/{direction}"]) == _losses(out["sharded/off"])[1:]
    assert_fsdp2(root / "sharded" / "off_live", {"load", "step", "save"})
    # FULL_STATE_DICT with the plugin: bit for bit; without it the resume of stock's own file is not
    assert_resumed_equals_whole(out["full/live"], out["full/live_live"], 2)
    assert_fsdp2(root / "full" / "live_live", {"load", "step", "save"})
    reset = differences(load_file(out["full/off"] / "adapter_model.safetensors"),
                        load_file(out["full/off_off"] / "adapter_model.safetensors"))
    assert reset, "stock's FSDP2 resume restored its own shards whole"
    # across the switch: the plugin's file refused by stock's own check, stock's by the plugin
    assert disabled.returncode != 0 and "got mixed torch.Tensor and DTensor" in disabled.stderr, disabled.stderr[-5000:]
    assert not (out["full/live_off"] / "adapter_model.safetensors").exists()
    assert again.returncode != 0 and REFUSED in again.stdout + again.stderr, again.stderr[-5000:]
    assert not (out["full/off_live"] / "adapter_model.safetensors").exists()
