"""``llamafactory-hera eval`` through its real command line on the tiny models: a HeRA run against its
``hera_lambda: 0`` twin, a RAH-LoRA adapter against its base and a HARC run against its base, each on the offline
``demo`` tasks run by lmms-eval / lm-eval; the cache (a finished task is kept when a later one fails, a rerun skips
it); no task folder left in the temporary directory; and the user's mistakes, each one line before any model (or
library) is loaded.

Cost: the runs are trained through ``run_exp`` in the test process, and the RAH-LoRA and HARC evals and the one-line
errors run ``main(argv)`` there too (:func:`run_verb`). Real ``llamafactory-hera`` processes where the process is
tested: the HeRA pair's two evals (``demo,mmvp`` then the cached ``demo`` rerun; several tests read them), whose demo
task folder is removed at the process's exit and whose failing run ends with one error line and exit code 2; and the
one-line errors all together in a fresh interpreter, to show they import nothing heavy."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import base_recipe, harc_recipe, mixed_size_dataset, offline_env, run_verb

EVAL = str(Path(sys.executable).with_name("llamafactory-hera"))
REPORT_SUFFIXES = (".json", ".md", ".png")
TASK_FOLDERS = "llamafactory_hera_eval_tasks_*"  # libraries._demo_folder's prefix
HEAVY = ("torch", "transformers", "llamafactory", "lmms_eval", "lm_eval")  # loaded by no one-line error


@dataclass
class Evaluated:
    """One ``llamafactory-hera eval`` process: its result, wall seconds, and the task folders it left in TMPDIR."""

    proc: subprocess.CompletedProcess
    seconds: float
    left_in_tmp: list[str]


def run_eval(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Evaluated:
    """The console script in a fresh process whose TMPDIR is a fresh folder (read back for left-behind folders: the
    demo task folder is removed at the process's exit)."""
    scratch = Path(tempfile.mkdtemp(prefix="tmpdir_", dir=tmp))
    started = time.perf_counter()
    env = env or offline_env(tmp, eval_extra=True)  # lmms-eval imports wandb
    proc = subprocess.run([EVAL, "eval", *args], cwd=tmp, env={**env, "TMPDIR": str(scratch)},
                          capture_output=True, text=True, timeout=900)
    return Evaluated(proc, time.perf_counter() - started, sorted(p.name for p in scratch.glob(TASK_FOLDERS)))


def ok(evaluated: Evaluated) -> None:
    proc = evaluated.proc
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert not evaluated.left_in_tmp, evaluated.left_in_tmp


def report(run_dir: Path, stem: str) -> dict[str, Any]:
    """The comparison's report (``eval_report_vs_base``, ``eval_report_vs_<baseline folder>``), its three files."""
    for suffix in REPORT_SUFFIXES:
        path = run_dir / f"{stem}{suffix}"
        assert path.is_file() and path.stat().st_size > 0, path.name
    return json.loads((run_dir / f"{stem}.json").read_text(encoding="utf-8"))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llamafactory-hera: error: "), proc.stderr[-4000:]
    return lines[0]


def error_in_process(capfd: pytest.CaptureFixture[str], *args: str, reads_registry: bool = False) -> str:
    """``llamafactory-hera eval ARGS`` in this process (:func:`run_verb`): its one line. Unless the test process had
    them already (or the error is an unknown task name, which reads the library's registry), the heavy libraries are
    still unloaded after the error."""
    loaded_before = {name for name in HEAVY if name in sys.modules}
    line = one_line_error(run_verb(capfd, "eval", *args))
    if not reads_registry:
        assert {name for name in HEAVY if name in sys.modules} <= loaded_before, "an error path loaded a library"
    return line


def train(recipe: dict[str, Any]) -> None:
    """The recipe through LLaMA-Factory's ``run_exp`` (what ``llamafactory-cli train`` runs) in this process: the runs
    are what the eval reads, not what is tested here, and each new process would import torch and LLaMA-Factory
    again (about 10 s). On one thread (:func:`one_thread`)."""
    from llamafactory.train.tuner import run_exp

    with one_thread():
        run_exp(recipe)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block, as ``offline_env`` runs a process (OMP_NUM_THREADS=1): torch's default of
    one per core fights the other work on a shared 2-core machine (measured serially under load: the HARC test took
    177 s with it, 58 s on one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hera_pair(assets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1-step HeRA run on the tiny Qwen2.5-VL, on images of mixed sizes, and its twin: the same recipe as a plain
    ``stage: sft`` run of ``llamafactory-cli`` (recorded by the plugin's llamafactory_hera_run.json)."""
    tmp = tmp_path_factory.mktemp("eval_hera")
    data = {"max_steps": 1, "dataset_dir": str(mixed_size_dataset(assets, tmp / "data"))}
    train(base_recipe(assets, "qwen2_5_vl", tmp / "hera", **data))
    train({**base_recipe(assets, "qwen2_5_vl", tmp / "twin", **data), "stage": "sft"})
    assert not any(p.name.startswith("hera_") for p in (tmp / "twin").iterdir())
    return tmp / "hera", tmp / "twin"


@dataclass
class HeraEvals:
    """The HeRA run against its twin on ``demo,mmvp`` (mmvp fails: its datasets cache entry is empty) and the rerun
    on ``demo`` (cached)."""

    run_dir: Path
    twin: Path
    first: Evaluated
    first_record: dict[str, Any]
    first_markdown: str
    rerun: Evaluated
    rerun_record: dict[str, Any]


@pytest.fixture(scope="module")
def hera_evals(hera_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> HeraEvals:
    run_dir, twin = hera_pair
    tmp = tmp_path_factory.mktemp("eval_hera_runs")
    # a prepared-looking but empty datasets cache entry of mmvp (its info, no data): past the offline check, it fails
    # once loading
    entry = tmp / "hf_home" / "datasets" / "lmms-lab-eval___mmvp" / "default" / "0.0.0" / "empty"
    entry.mkdir(parents=True)
    (entry / "dataset_info.json").write_text(json.dumps({"config_name": "default", "splits": {"train": {
        "name": "train", "num_examples": 1}}}), encoding="utf-8")
    first = run_eval(tmp, str(run_dir), "--baseline", str(twin), "--tasks", "demo,mmvp")
    first_record = report(run_dir, "eval_report_vs_twin")
    first_markdown = (run_dir / "eval_report_vs_twin.md").read_text(encoding="utf-8")
    rerun = run_eval(tmp, str(run_dir), "--baseline", str(twin), "--tasks", "demo")
    print(f"hera vs twin on demo,mmvp: {first.seconds:.1f} s; cached demo rerun {rerun.seconds:.1f} s")
    return HeraEvals(run_dir, twin, first, first_record, first_markdown, rerun, report(run_dir, "eval_report_vs_twin"))


def test_hera_run_against_its_twin_on_the_demo(hera_evals: HeraEvals) -> None:
    record = hera_evals.first_record
    rows = [r for r in record["rows"] if r["task"] == "llamafactory_hera_demo_mllm"]
    assert [r["metric"] for r in rows] == ["accuracy"] and rows[0]["group"] == "Demo"
    assert rows[0]["run"] is not None and rows[0]["baseline"] is not None
    assert rows[0]["delta"] == pytest.approx(rows[0]["run"] - rows[0]["baseline"])
    assert record["baseline"]["run_dir"] == str(hera_evals.twin) and record["run"]["stage"] == "hera"
    assert "## Demo" in hera_evals.first_markdown
    assert "| llamafactory_hera_demo_mllm | accuracy |" in hera_evals.first_markdown


def test_a_failing_task_keeps_the_finished_one(hera_evals: HeraEvals) -> None:
    """mmvp's (empty) datasets cache entry passes the offline check but cannot be read: it fails on both models, the
    demo's results stay in the report and the cache (the rerun reads them)."""
    proc = hera_evals.first.proc
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llamafactory-hera: error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0])  # after the progress bars, one line
    assert "run/mmvp" in errors[0] and "baseline/mmvp" in errors[0]
    assert "FileNotFoundError" in errors[0] and "rerun" in errors[0]
    record = hera_evals.first_record
    assert {r["task"] for r in record["rows"]} == {"llamafactory_hera_demo_mllm"}
    assert "mmvp" in record["failed"]["run"] and "mmvp" in record["failed"]["baseline"]
    assert "- run: mmvp: " in hera_evals.first_markdown


def test_a_rerun_reads_the_finished_tasks_from_the_cache(hera_evals: HeraEvals) -> None:
    ok(hera_evals.rerun)
    record = hera_evals.rerun_record
    assert record["run"]["cached_tasks"] == ["llamafactory_hera_demo_mllm"]
    assert record["baseline"]["cached_tasks"] == ["llamafactory_hera_demo_mllm"]
    assert "loading" not in hera_evals.rerun.proc.stdout + hera_evals.rerun.proc.stderr  # nothing loaded
    assert not record["failed"] and record["rows"] == hera_evals.first_record["rows"]


def test_eval_leaves_no_task_folder_in_the_temporary_directory(hera_evals: HeraEvals) -> None:
    """Each process wrote its demo task folder under its TMPDIR (the test's own folder) and removed it at exit, on
    the failing run (exit 2) as on the finished one."""
    assert hera_evals.first.left_in_tmp == [] and hera_evals.rerun.left_in_tmp == []


def test_the_demo_images_are_of_mixed_sizes_and_its_answers_long(hera_evals: HeraEvals) -> None:
    """The MLLM demo asks on images of several sizes and shapes and lets answers run long (as benchmarks do); the
    HeRA pair's eval above (tiny Qwen2.5-VL, trained on images of mixed sizes) and the RAH one (tiny LLaVA) run it."""
    from llamafactory_hera.evaluation.demo_tasks import mllm_doc_to_visual, mllm_rows, write_demo_tasks

    sizes = {mllm_doc_to_visual(row)[0].size for row in mllm_rows()}
    assert len(sizes) >= 4 and any(width != height for width, height in sizes), sizes
    task = write_demo_tasks(hera_evals.run_dir.parent / "demo_task", "lmms-eval")
    yaml_text = (task / "llamafactory_hera_demo_mllm.yaml").read_text(encoding="utf-8")
    assert int(yaml_text.split("max_new_tokens:")[1].split()[0]) >= 32
    assert all(r["run"] is not None for r in hera_evals.first_record["rows"])


def test_a_twin_without_a_record_alone_needs_a_template(hera_pair: tuple[Path, Path], tmp_path: Path,
                                                         capfd) -> None:
    """The plugin's run record names the twin's template; a twin trained without the plugin (its adapter alone)
    needs --template."""
    from llamafactory_hera.evaluation.runs import read_run

    assert read_run(hera_pair[1], "run", trained=True).recipe["template"] == "qwen2_vl"
    (tmp_path / "adapter_config.json").write_bytes((hera_pair[1] / "adapter_config.json").read_bytes())
    line = error_in_process(capfd, str(tmp_path), "--tasks", "demo")
    assert "records no template" in line and "--template" in line


def test_rah_adapter_against_its_base(assets, tmp_path: Path, capfd) -> None:
    from llamafactory_hera.demo.rah import build_rah_recipe

    # small and forced to calibrate some heads on the random tiny model (as tests/rah/test_rah_stage.py's FORCED)
    forced = {"rah_samples": 6, "rah_probe_samples": 3, "rah_kl_samples": 2, "rah_isal_percentile": 50,
              "rah_caf_percentile": 0, "rah_beta": -100, "rah_num_anchors": 2, "rah_rank": 2, "rah_delta": 10.0}
    train({**build_rah_recipe(assets, "llava", tmp_path / "rah"), **forced})
    with one_thread():
        proc = run_verb(capfd, "eval", tmp_path / "rah", "--base", "--tasks", "demo", cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    record = report(tmp_path / "rah", "eval_report_vs_base")
    assert record["run"]["stage"] == "rah" and record["baseline"]["trained"] is False
    assert "adapter" in record["run"]["model"] and "adapter" not in record["baseline"]["model"]
    assert all(r["run"] is not None and r["baseline"] is not None for r in record["rows"])


def test_harc_run_against_its_base(harc_assets, tmp_path: Path, capfd) -> None:
    train(harc_recipe(harc_assets, "qwen2", tmp_path / "harc", harc_eval=False))
    with one_thread():
        proc = run_verb(capfd, "eval", tmp_path / "harc", "--base", "--tasks", "demo", "--batch-size", "4",
                        cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    record = report(tmp_path / "harc", "eval_report_vs_base")
    metrics = {(r["group"], r["task"], r["metric"]) for r in record["rows"]}
    assert ("Demo", "llamafactory_hera_demo_text", "acc") in metrics
    assert ("Refusal", "harc_refusal", "refusal_rate_harmful") in metrics
    assert ("Refusal", "harc_refusal", "refusal_rate_pseudo") in metrics
    assert all(r["run"] is not None and r["baseline"] is not None for r in record["rows"])
    assert "## Refusal" in (tmp_path / "harc" / "eval_report_vs_base.md").read_text(encoding="utf-8")
    assert record["run"]["precision"] == record["baseline"]["precision"] == "float32"  # LLaMA-Factory's on a CPU
    assert "eval: evaluated in run: float32; baseline: float32" in proc.stdout + proc.stderr


@pytest.mark.usefixtures("repacking_cpu")
def test_a_qlora_run_is_evaluated_on_its_4_bit_base_and_says_so(harc_assets, tmp_path: Path, capfd) -> None:
    """A QLoRA run (stock sft, quantization_bit: 4) and its base are evaluated in 4 bits as the run trained, and the
    console, the report and its record say the precision (before, the base was loaded unquantized, unsaid)."""
    recipe = harc_recipe(harc_assets, "qwen2", tmp_path / "qlora", max_steps=1)  # its twin: harc_* keys ignored
    train({**recipe, "stage": "sft", "dataset": "harc_harmless", "quantization_bit": 4})
    loading = json.loads((tmp_path / "qlora" / "llamafactory_hera_run.json").read_text())["loading"]
    assert loading["quantization_bit"] == 4
    with one_thread():
        proc = run_verb(capfd, "eval", tmp_path / "qlora", "--base", "--tasks", "demo", "--batch-size", "4",
                        cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    record = report(tmp_path / "qlora", "eval_report_vs_base")
    wanted = "4-bit bitsandbytes nf4, float32 compute"
    assert record["run"]["precision"] == record["baseline"]["precision"] == wanted, record["run"]
    assert f"eval: the run model is evaluated in {wanted}" in proc.stdout + proc.stderr
    assert f"eval: evaluated in run: {wanted}; baseline: {wanted}" in proc.stdout + proc.stderr
    assert f"(stage sft; {wanted})" in (tmp_path / "qlora" / "eval_report_vs_base.md").read_text(encoding="utf-8")


# --- the user's mistakes: one line, before any model is loaded ---

@pytest.fixture
def recorded_run(assets, tmp_path: Path) -> Path:
    """A folder with a HeRA run record and an adapter config (nothing to load: the errors come first)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = {"model_name_or_path": str(assets.models["qwen2_5_vl"]), "template": "qwen2_vl", "seed": 0}
    (run_dir / "hera_run.json").write_text(json.dumps({"stage": "hera", "host": host}), encoding="utf-8")
    (run_dir / "adapter_config.json").write_text("{}", encoding="utf-8")
    return run_dir


def test_unknown_preset_names_the_closest(recorded_run: Path, capfd) -> None:
    line = error_in_process(capfd, str(recorded_run), "--tasks", "vision-centrc")
    assert "unknown preset or task 'vision-centrc'" in line and "did you mean vision-centric" in line


def test_unknown_task_names_the_closest_registry_task(recorded_run: Path, capfd) -> None:
    line = error_in_process(capfd, str(recorded_run), "--tasks", "realworldq", reads_registry=True)
    assert "unknown preset or task 'realworldq'" in line and "realworldqa" in line


def test_a_text_preset_on_an_mllm_run(recorded_run: Path, capfd) -> None:
    line = error_in_process(capfd, str(recorded_run), "--tasks", "capability")
    assert "preset 'capability' is for text models" in line and "vision-centric" in line


def test_a_folder_without_a_run(tmp_path: Path, capfd) -> None:
    line = error_in_process(capfd, str(tmp_path), "--tasks", "demo")
    assert "holds no run record" in line and "hera_run.json" in line


def test_a_run_without_its_model(recorded_run: Path, capfd) -> None:
    """The run's adapter files gone: one line, with or without --base (which used to be suggested when given; it
    compares the trained model with its base and cannot do without the trained one)."""
    (recorded_run / "adapter_config.json").unlink()
    said = (f"RUN_DIR: {recorded_run} has neither adapter_config.json nor config.json (did training finish?): it "
            "holds no trained model to evaluate{}. Give the output_dir of a finished run, or finish this one "
            "(resume_from_checkpoint: one of its checkpoints)")
    assert error_in_process(capfd, str(recorded_run), "--tasks", "demo").endswith(said.format(""))
    line = error_in_process(capfd, str(recorded_run), "--tasks", "demo", "--base")
    assert line.endswith(said.format(", nor to compare with its base (--base)")), line


def test_twins_without_a_record_read_as_the_runs_kind_of_model(tmp_path: Path) -> None:
    """A HeRA run on a hub-id MLLM (no local config.json: the template tells it is multimodal) against the two
    record-less SFT twins its recipes document: the LoRA twin (base in adapter_config.json) and the full twin (the
    folder is the model; --base cannot know its base). Found by review: both were refused or read as text models."""
    from llamafactory_hera.evaluation.runs import read_pair

    run_dir, lora_twin, full_twin = tmp_path / "hera", tmp_path / "lora_sft", tmp_path / "full_sft"
    for folder in (run_dir, lora_twin, full_twin):
        folder.mkdir()
    host = {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "template": "qwen2_vl", "image_max_pixels": 262144}
    (run_dir / "hera_run.json").write_text(json.dumps({"stage": "hera", "host": host}), encoding="utf-8")
    (run_dir / "adapter_config.json").write_text("{}", encoding="utf-8")
    (lora_twin / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": host["model_name_or_path"]}),
                                                  encoding="utf-8")
    (full_twin / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}), encoding="utf-8")
    run, twin = read_pair(run_dir, lora_twin, base=False)
    assert run.modality == twin.modality == "mllm" and run.recipe["image_max_pixels"] == 262144
    assert twin.recipe["template"] == "qwen2_vl" and twin.recipe["adapter_name_or_path"] == str(lora_twin)
    run, twin = read_pair(run_dir, full_twin, base=False)
    assert twin.modality == "mllm" and twin.recipe["model_name_or_path"] == str(full_twin)
    with pytest.raises(ValueError, match="--base: .* is a full fine-tuning run without a run record"):
        read_pair(full_twin, None, base=True, template="qwen2_vl")


def shadow_without_lmms_eval(tmp_path: Path) -> Path:
    """A folder whose ``lmms_eval`` fails to import, as in an environment without the extra (put it first on the
    path)."""
    shadow = tmp_path / "shadow" / "lmms_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'lmms_eval'\")\n", encoding="utf-8")
    return shadow.parent


def test_the_missing_extra(recorded_run: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    """Without lmms-eval (an import that fails, as in an environment without the extra) the fix is named."""
    monkeypatch.delitem(sys.modules, "lmms_eval", raising=False)  # an earlier test may have imported the real one
    monkeypatch.syspath_prepend(str(shadow_without_lmms_eval(tmp_path)))
    line = error_in_process(capfd, str(recorded_run), "--tasks", "demo")
    assert "pip install 'llamafactory-hera[eval]'" in line


def test_the_users_mistakes_load_no_library(recorded_run: Path, tmp_path: Path) -> None:
    """The one-line errors above, all in one fresh process (``cli.main`` as the console script runs it, the extra
    shadowed as missing): each is one line, and none loaded torch, transformers, LLaMA-Factory or either library."""
    no_model, empty = tmp_path / "no_model", tmp_path / "empty"
    for folder in (no_model, empty):
        folder.mkdir()
    (no_model / "hera_run.json").write_bytes((recorded_run / "hera_run.json").read_bytes())
    cases = [[str(recorded_run), "--tasks", "vision-centrc"], [str(recorded_run), "--tasks", "capability"],
             [str(empty), "--tasks", "demo"], [str(no_model), "--tasks", "demo"],
             [str(recorded_run), "--tasks", "demo", "--gcg-steps", "3"],  # read by the jailbreak task's module
             [str(recorded_run), "--tasks", "demo"]]  # the last: the extra is missing
    script = ("import json, sys\nfrom llamafactory_hera.cli import main\n"
              "codes = [main(['eval', *case]) for case in json.loads(sys.argv[1])]\n"
              f"print(json.dumps({{'codes': codes, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n")
    env = offline_env(tmp_path, PYTHONPATH=str(shadow_without_lmms_eval(tmp_path)))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome = json.loads(proc.stdout.splitlines()[-1])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert outcome == {"codes": [2] * len(cases), "loaded": []}, (outcome, proc.stderr[-4000:])
    assert len(lines) == len(cases) and all(line.startswith("llamafactory-hera: error: ") for line in lines), lines
    assert "pip install 'llamafactory-hera[eval]'" in lines[-1]


def test_the_demos_install_line_names_the_eval_extra_of_pyproject() -> None:
    import tomllib

    from conftest import REPO
    from llamafactory_hera.evaluation.cli import EXTRA_PACKAGES, SCORER_PACKAGES

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [*EXTRA_PACKAGES, *SCORER_PACKAGES] == extras["eval"] and set(EXTRA_PACKAGES) <= set(extras["test"])


def test_every_preset_task_is_in_its_library_registry() -> None:
    """The presets name tasks of lmms-eval 0.7.3 / lm-eval 0.4.13's own registries (read in-process: no model;
    each registry is built once per process and shared with the unknown-task test)."""
    from llamafactory_hera.evaluation.libraries import known_tasks
    from llamafactory_hera.evaluation.presets import LM, LMMS, PRESETS, library_of

    for library, modality in ((LMMS, "mllm"), (LM, "text")):
        known = known_tasks(library)
        missing = {p.name: [t for t in p.tasks if t not in known and library_of(t, modality) == library]
                   for p in PRESETS.values() if p.modality == modality}
        assert not any(missing.values()), (library, missing)
