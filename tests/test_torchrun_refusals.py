"""A refused recipe under torchrun, a missing DeepSpeed, and the recipe mistakes that still
ended in LLaMA-Factory's or its libraries' tracebacks with a plugin stage.

Before: under ``FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train`` a misspelt plugin key printed its line once
per rank, then torch's ``ChildFailedError`` traceback and the launcher's ``CalledProcessError`` (58 lines); under a bare
``torchrun --nproc_per_node 2`` the same lines without the launcher's (45); a recipe naming a DeepSpeed config where
DeepSpeed is not installed, transformers' ``PackageNotFoundError`` (71 lines); ``image_max_pixels: big`` a
``TypeError`` (39), a YAML syntax error PyYAML's ``ParserError`` (35), a recipe path that does not exist omegaconf's
``FileNotFoundError`` (19). Now: ``llamafactory-cli train`` checks the recipe once before it starts torchrun
(``patches/.../launch.py``); a refusal in the ranks (a bare torchrun's or ft_launcher's, a node-local output_dir
under any launcher) is left by the ranks to their node's elastic agent, which prints it as the node's last line
(``job_refusal``, ``patches/.../elastic_agent.py``); the rest are one line each (``recipe_file.py``,
``recipe/raw_checks.py``, ``recipe/host_keys.py``). And a run whose rank 0 a launcher's monitor kills is recorded
``failed`` by the agent (it said ``running`` for good).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_launch_refusals import _refused

from conftest import REPO, base_recipe, free_port, harc_recipe, offline_env, run_process, run_train
from llamafactory_hera.job_refusal import RecipeError, waits_for_rank_0

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FT_LAUNCHER = Path(sys.executable).with_name("ft_launcher")
ERROR = "[llamafactory-hera] error: "


def _lines(proc: Any) -> list[str]:
    return (proc.stdout + proc.stderr).rstrip("\n").split("\n")


def ends_with_refusal(printed: str, refusal: str) -> list[str]:
    """A node's output (``printed``): the refusal (its line starts with ``refusal``) once and last, no traceback or
    launcher report (torch's ``ChildFailedError``) anywhere. Returns its non-empty lines."""
    lines = [line for line in printed.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(refusal), "\n".join(lines)
    assert sum(line.startswith(refusal) for line in lines) == 1, "\n".join(lines)
    assert not [line for line in lines if "Traceback" in line or "ChildFailedError" in line], "\n".join(lines)
    return lines


def _misspelt(harc_assets: Any, tmp_path: Path) -> dict[str, Any]:
    return harc_recipe(harc_assets, "llama3", tmp_path / "out", max_steps=1, harc_bandd=1)


MISSPELT = f"{ERROR}Unknown HARC key 'harc_bandd'. Did you mean 'harc_band'? Valid keys: "


def test_llamafactory_cli_checks_the_recipe_once_before_torchrun(harc_assets: Any, tmp_path: Path) -> None:
    """``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``: the launcher refuses the recipe; no rank starts (58 lines before, the
    message twice, torch's and the launcher's tracebacks)."""
    proc = run_train(_misspelt(harc_assets, tmp_path), tmp_path, check=False,
                     env={"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2"})
    lines = _lines(proc)
    assert proc.returncode == 1 and len(lines) <= 4, "\n".join(lines)
    assert lines[-1].startswith(MISSPELT), "\n".join(lines)
    assert not any("distributed tasks" in line or "Traceback" in line for line in lines), "\n".join(lines)


def test_heads_outside_the_model_are_refused_before_torchrun_starts(assets: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``FORCE_TORCHRUN=1 NPROC_PER_NODE=2`` with ``hera_heads`` out of range started both ranks, and ``[rank0]``
    printed the refusal after the parse: the heads check needs only the model's config.json, so the launcher runs it
    before torchrun (``hera/checks.check_heads_before_parse``). Here the patched ``launch()`` in this process, with
    torchrun's start failing the test: the refusal, nothing started."""
    import subprocess

    import llamafactory.launcher

    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", hera_heads=["L0H0", "L99H0"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    for key, value in {"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", str(path)])
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail(f"torchrun started: {args}"))
    with pytest.raises(RecipeError) as error:
        llamafactory.launcher.launch()
    model = recipe["model_name_or_path"]
    assert str(error.value).startswith(f"hera_heads: L99H0 is outside {model}, which has layers L0..L"), error.value
    assert str(error.value).endswith(" per layer (zero-based). Fix or remove L99H0."), error.value


def test_llamafactory_cli_runs_rah_as_one_process_on_a_multi_gpu_node(assets: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two visible devices, no FORCE_TORCHRUN: stock launch() would start torchrun with a rank per device, which
    stage: rah refuses; the patched launch() checks the recipe and starts a torchrun of ONE rank (which sees every GPU,
    so its placement spreads the model over them). Not run_exp() in this process: there transformers' arguments see
    two GPUs and no launcher, and LLaMA-Factory's parse asks for torchrun (checked below with the real parse)."""
    import subprocess

    import llamafactory.extras.misc
    import llamafactory.launcher
    import llamafactory.train.tuner

    from llamafactory_hera.demo.rah import build_rah_recipe

    started: list[Any] = []
    monkeypatch.delenv("FORCE_TORCHRUN", raising=False)
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.setattr(llamafactory.extras.misc, "get_device_count", lambda: 2)
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: started.append(args) or subprocess.CompletedProcess(
        args, 0))
    monkeypatch.setattr(llamafactory.train.tuner, "run_exp", lambda: pytest.fail("run_exp ran in the launcher"))
    path = tmp_path / "rah.yaml"
    recipe = build_rah_recipe(assets, "qwen2_5_vl", tmp_path / "out")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", str(path)])
    with pytest.raises(SystemExit) as ended:
        llamafactory.launcher.launch()
    assert ended.value.code == 0
    [command] = started
    assert command[0] == "torchrun" and command[command.index("--nproc_per_node") + 1] == "1", command
    assert command[-1] == str(path)
    # what the one-rank torchrun avoids: the parse in a process seeing two GPUs without a launcher
    # (transformers: NOT_DISTRIBUTED when a process without a launcher sees n_gpu > 1, faked here on the CPU)
    from llamafactory.hparams import get_train_args
    from transformers.training_args import ParallelMode, TrainingArguments

    monkeypatch.setattr(TrainingArguments, "parallel_mode", property(lambda self: ParallelMode.NOT_DISTRIBUTED))
    with pytest.raises(ValueError, match="torchrun"):
        get_train_args({**{k: v for k, v in recipe.items() if not k.startswith("rah_")}, "stage": "sft"})


@pytest.mark.parametrize("launcher", ["torchrun", "ft_launcher"])
def test_a_bare_launcher_prints_a_refusal_once_and_last(launcher: str, harc_assets: Any, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 .../llamafactory/launcher.py recipe.yaml`` (a SLURM node's step without
    ``llamafactory-cli``), and nvidia-resiliency-ext's ``ft_launcher`` with docs/multinode.md's options: every rank
    refuses; the line is left to the launcher's agent, which prints it as the node's last line and exits 1. Before:
    the line, then torch's report of the failed job (its ``ChildFailedError`` traceback: 45 lines in all under
    torchrun), or ft_launcher's error lines on the ranks' exit codes."""
    import llamafactory.launcher

    port = str(free_port())
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", port]
    if launcher == "ft_launcher":
        if not FT_LAUNCHER.is_file():
            pytest.skip("nvidia-resiliency-ext is not installed here (pip install '.[ft]')")
        command = [str(FT_LAUNCHER), "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{port}"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_misspelt(harc_assets, tmp_path), sort_keys=False), encoding="utf-8")
    proc = run_process([*command, llamafactory.launcher.__file__, str(recipe)],
                       cwd=tmp_path, env=offline_env(tmp_path), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    printed = proc.stdout + proc.stderr
    # ft_launcher's health checks before the ranks start: NVML's traceback on a machine without NVIDIA's driver
    printed = printed[printed.rfind("gpu_ib_map:"):] if launcher == "ft_launcher" else printed
    lines = ends_with_refusal(printed, MISSPELT)
    assert len(lines) <= 8, "\n".join(lines)


def test_a_node_local_output_dir_is_each_nodes_last_line(harc_assets: Any, tmp_path: Path) -> None:
    """Two nodes of one job on this machine, each started in a folder of its own with ``output_dir: out`` (each node's
    output_dir its own folder, as on a node's local disk): node 0 by ``FORCE_TORCHRUN=1 NNODES=2 llamafactory-cli
    train``, node 1 by ``accelerate launch --num_machines 2 -m llamafactory.launcher`` (one launch for both launchers:
    they meet in the same static rendezvous), one rank each. The ranks' shared-output probe refuses the folder on both
    nodes; each node's launcher (torchrun's agent, accelerate's) prints the refusal as the node's last line and exits
    1. Before: the line, then torch's ChildFailedError report and c10d's C++ frames from the start watch's calls to
    the store gone with the job (about 105 lines a node)."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import CLI

    recipe = _misspelt(harc_assets, tmp_path)
    del recipe["harc_bandd"]
    recipe["output_dir"] = "out"  # relative: each node's own folder
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    port = str(free_port())
    commands = [[CLI, "train", str(path)],
                [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_machines", "2",
                 "--machine_rank", "1", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                 "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                 "llamafactory.launcher", str(path)]]
    torchrun_env = {"FORCE_TORCHRUN": "1", "NNODES": "2", "NODE_RANK": "0", "NPROC_PER_NODE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}

    def node(rank: int) -> Any:
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        # each node looks 2 s for the other's probe file, not 30 (tests/process_hooks/sitecustomize.py)
        env = offline_env(folder, HERA_TEST_PROBE_SEEN_S="2", **(torchrun_env if rank == 0 else {}))
        return run_process(commands[rank], cwd=folder, env=env, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(node, (0, 1)))
    for rank, proc in enumerate(procs):
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = ends_with_refusal(proc.stdout + proc.stderr, f"{ERROR}output_dir: out is not one folder shared by the "
                                  f"job's 2 nodes: node {rank} (")
        assert len(lines) <= 8, "\n".join(lines)


def test_only_another_rank_of_a_torchrun_job_waits_for_rank_0() -> None:
    job = {"TORCHELASTIC_RUN_ID": "none"}
    assert waits_for_rank_0({**job, "RANK": "1"}) and waits_for_rank_0({**job, "RANK": "7"})
    assert not waits_for_rank_0({**job, "RANK": "0"}) and not waits_for_rank_0(job)
    assert not waits_for_rank_0({"RANK": "1"})  # not torchrun's (no agent stops it): it prints its own


def test_a_deepspeed_config_without_deepspeed_is_one_line_with_the_install_command(harc_assets: Any,
                                                                                    tmp_path: Path) -> None:
    """The README's environment has no DeepSpeed (tests/without_deepspeed hides the test environment's): a recipe
    naming a ZeRO config ended in transformers' ``PackageNotFoundError`` traceback (71 lines) while the arguments
    were parsed."""
    config = REPO / "recipes" / "deepspeed" / "ds_z3_config.json"
    recipe = harc_recipe(harc_assets, "llama3", tmp_path / "out", max_steps=1, deepspeed=str(config))
    hidden = os.pathsep.join([str(REPO / "tests" / "without_deepspeed"), os.environ.get("PYTHONPATH", "")])
    proc = run_train(recipe, tmp_path, check=False, env={"PYTHONPATH": hidden})
    lines = _lines(proc)
    assert proc.returncode == 1 and len(lines) <= 4, "\n".join(lines)
    assert lines[-1] == (f"{ERROR}deepspeed: {config} needs DeepSpeed, which is not installed here. Install it: pip "
                         "install 'deepspeed>=0.9.3' (or remove deepspeed to train without it)."), "\n".join(lines)


def test_a_generating_predict_without_its_metric_packages_is_one_line_before_torchrun(assets: Any,
                                                                                    tmp_path: Path) -> None:
    """``do_predict`` with ``predict_with_generate`` where LLaMA-Factory's metric packages (jieba, nltk, rouge-chinese)
    are not installed failed on every rank at the parse, each in a PackageNotFoundError traceback; now the launcher
    names them before torchrun starts, its line the last."""
    import importlib.util

    if all(importlib.util.find_spec(name) for name in ("jieba", "nltk", "rouge_chinese")):
        pytest.skip("LLaMA-Factory's metric packages are installed here")
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", max_steps=1, do_predict=True,
                         predict_with_generate=True)
    recipe["eval_dataset"] = recipe["dataset"]
    proc = run_train(recipe, tmp_path, check=False, env={"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2"})
    lines = _lines(proc)
    assert proc.returncode == 1 and len(lines) <= 4, "\n".join(lines)
    assert lines[-1] == (f"{ERROR}predict_with_generate: true needs the packages of LLaMA-Factory's BLEU and ROUGE "
                         "scores (jieba, nltk, rouge-chinese), which are not installed here. Install them: pip install "
                         "jieba nltk rouge-chinese (or remove predict_with_generate to predict without generating)."), \
        "\n".join(lines)
    assert not any("distributed tasks" in line or "Traceback" in line for line in lines), "\n".join(lines)


@pytest.mark.usefixtures("no_model_load")
def test_rah_without_deepspeed_still_says_to_remove_deepspeed(assets: Any, harc_assets: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """RAH-LoRA refuses DeepSpeed: its own message comes first, not the install command."""
    import importlib.util

    from test_launch_refusals import _recipe

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "deepspeed" else find_spec(name, *rest))
    config = str(REPO / "recipes" / "deepspeed" / "ds_z3_config.json")
    assert _refused(_recipe("rah", assets, harc_assets, tmp_path / "out", deepspeed=config)).endswith(
        "stage: rah takes no optimizer step and runs as one process; remove deepspeed.")
    assert _refused(_recipe("harc", assets, harc_assets, tmp_path / "out", deepspeed=config)).startswith(
        f"deepspeed: {config} needs DeepSpeed, which is not installed here.")


@pytest.mark.usefixtures("no_model_load")
def test_a_number_key_given_no_number_is_refused_before_the_parse(harc_assets: Any, tmp_path: Path) -> None:
    """``image_max_pixels: big`` ended in ``TypeError: '<' not supported between instances of 'str' and 'int'`` in
    LLaMA-Factory's ``ProcessorArguments.__post_init__``."""
    recipe = harc_recipe(harc_assets, "llama3", tmp_path / "out", image_max_pixels="big")
    assert _refused(recipe) == ("image_max_pixels: 'big' is not a whole number (ModelArguments: The maximum number "
                                "of pixels of image inputs; default 589824). Set image_max_pixels to a whole number.")
    message = _refused(harc_recipe(harc_assets, "llama3", tmp_path / "out", temperature="warm"))
    assert message.startswith("temperature: 'warm' is not a number (GeneratingArguments: "), message


def test_number_keys_given_numbers_pass() -> None:
    from llamafactory_hera.recipe.host_keys import check_number_types

    check_number_types({"image_max_pixels": 1024, "video_fps": "2.5", "max_samples": None, "lora_alpha": "null",
                        "temperature": 0.5, "top_k": "40", "quantization_bit": None})
    with pytest.raises(RecipeError, match=r"^video_maxlen: '1.5' is not a whole number \(ModelArguments: "):
        check_number_types({"video_maxlen": "1.5"})  # a --key value list: argparse's int() would stop on it
    with pytest.raises(RecipeError, match=r"^image_max_pixels: None is not a whole number "):
        check_number_types({"image_max_pixels": None})  # not optional: the same TypeError


def _run_exp_on(path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``llamafactory-cli train <path>``'s ``run_exp()``: it reads the recipe from ``sys.argv``."""
    from llamafactory.train.tuner import run_exp

    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", str(path)])
    with pytest.raises(RecipeError) as error:
        run_exp()
    return str(error.value)


def test_a_recipe_path_that_does_not_exist_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _run_exp_on(Path("recipes/nosuch.yaml"), monkeypatch) == (
        f"recipe: recipes/nosuch.yaml does not exist (relative to the folder the run starts in, {tmp_path}). Name a "
        "recipe file: llamafactory-cli train path/to/recipe.yaml.")
    (tmp_path / "folder.yaml").mkdir()
    assert _run_exp_on(tmp_path / "folder.yaml", monkeypatch).startswith(
        f"recipe: {tmp_path / 'folder.yaml'} is a folder, not a file. Name a recipe file")


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("stage: harc\nharc_layers: [1, 2\nharc_band: 1\n", encoding="utf-8")
    assert _run_exp_on(path, monkeypatch) == (
        f"recipe: {path} is not valid YAML: did not find expected ',' or ']' at line 3, column 10 (while parsing a "
        "flow sequence at line 2, column 14). Correct the YAML there.")
    path.write_text("stage: harc\n\tharc_band: 1\n", encoding="utf-8")
    assert _run_exp_on(path, monkeypatch) == (f"recipe: {path} is not valid YAML: found a tab character that violates "
                                              "indentation at line 2, column 1 (while scanning a plain scalar at line "
                                              "1, column 8). Correct the YAML there.")


def test_an_empty_recipe_file_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty recipe file (or one of comments) ended in the parse's ``ValueError: Please provide
    `model_name_or_path`.`` traceback (44 lines): now a :class:`RecipeError` naming the file when ``run_exp`` reads
    it, before anything loads (one line and exit code 1, as every RecipeError: test_short_errors.py; the same read
    runs before torchrun starts, ``launch.py``)."""
    path = tmp_path / "recipe.yaml"
    for text in ("", "# the recipe, to come\n"):
        path.write_text(text, encoding="utf-8")
        assert _run_exp_on(path, monkeypatch) == (
            f"recipe: {path} is empty: it sets no keys. Write the run's keys into it (model_name_or_path, stage, "
            "dataset, output_dir, ...; recipes/ holds examples) or name another recipe file.")


def test_the_check_before_torchrun_leaves_v0s_version_checks_to_the_ranks(harc_assets: Any, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher reads v0's ``llamafactory.hparams`` for its check, whose import runs ``check_dependencies()``; a
    stock launcher runs none (its ranks do). Here v0's hparams are imported afresh with a version check that fails:
    the check before torchrun passes a stock and a plugin recipe alike, so the ranks run the checks as without the
    plugin."""
    import llamafactory
    import llamafactory.extras.misc as misc

    from llamafactory_hera_patches import launch

    def out_of_range() -> None:
        raise ImportError("trl>=0.18,<=0.24 is required, found trl==0.99")

    monkeypatch.setattr(misc, "check_dependencies", out_of_range)
    # the package's name for it put back afterwards (or removed, as the modules below)
    monkeypatch.setattr(llamafactory, "hparams", getattr(llamafactory, "hparams", None), raising=False)
    for stage in ("sft", "harc"):
        for name in [name for name in sys.modules if name.split(".")[:2] == ["llamafactory", "hparams"]]:
            monkeypatch.delitem(sys.modules, name)  # each put back afterwards
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(harc_recipe(harc_assets, "llama3", tmp_path / stage, stage=stage)))
        method = launch.check_before_ranks(["llamafactory-cli", "train", str(path)])
        assert getattr(method, "stage", None) == (None if stage == "sft" else stage)
        assert "llamafactory.hparams" in sys.modules


def test_the_agent_says_a_noted_refusal_last_and_keeps_any_other_failures_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """patches/.../elastic_agent.py around torch's ``launch_agent`` (here a stand-in): the ranks' notes folder is in
    their environment while they run; a refusal noted is printed and ends with exit code 1, no report; a failure
    without one (a real crash) is raised as it was, for torch's report; the folder goes with the launch. A folder's
    maker (llamafactory-cli) prints a refusal no agent said."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from llamafactory_hera.runtime import agent_notes
    from llamafactory_hera_patches import elastic_agent

    monkeypatch.delenv(agent_notes.NOTES_ENV, raising=False)
    failure = ProcessFailure(local_rank=1, pid=7, exitcode=1, error_file="none")
    crash = ChildFailedError("launcher.py", {1: failure})
    seen: list[str] = []

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)

    def agent(refuses: bool) -> None:
        seen.append(os.environ[agent_notes.NOTES_ENV])
        if refuses:
            assert agent_notes.note_refusal("[llamafactory-hera] error: the line\n")
        raise crash

    with pytest.raises(SystemExit) as ended:
        elastic_agent.launch_agent(lambda config, entry, args: agent(True), None, "launcher.py", [])
    assert ended.value.code == 1 and capsys.readouterr().err == "[llamafactory-hera] error: the line\n"
    with pytest.raises(ChildFailedError) as raised:
        elastic_agent.launch_agent(lambda config, entry, args: agent(False), None, "launcher.py", [])
    assert raised.value is crash and capsys.readouterr().err == ""
    assert agent_notes.NOTES_ENV not in os.environ and not [folder for folder in seen if Path(folder).exists()]
    with pytest.raises(ChildFailedError), agent_notes.taking(0) as notes:  # as llamafactory-cli holds it: its
        assert agent_notes.note_refusal("[llamafactory-hera] error: the line\n")  # torchrun's agent killed first
        raise crash
    assert capsys.readouterr().err == "[llamafactory-hera] error: the line\n" and not notes.exists()
    with agent_notes.taking(0):  # the launch ended well: nothing stale said
        assert agent_notes.note_refusal("[llamafactory-hera] error: the line\n")
    assert capsys.readouterr().err == ""
    assert elastic_agent.ended_how(crash) == "rank 1 exited with code 1"
    killed = ChildFailedError("launcher.py", {0: ProcessFailure(local_rank=0, pid=8, exitcode=-9, error_file="none")})
    assert elastic_agent.ended_how(killed) == "rank 0 was killed by SIGKILL"


def test_a_refusal_ends_the_job_only_from_the_last_start_of_the_ranks(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """MAX_RESTARTS=2 (a stand-in agent): a refusal noted by start 0 quiets no later agent log line, and is not said
    when start 1 succeeds nor when a later start crashes (the crash's report stays); one noted by start 2 (no restart
    left) is said, exit code 1. A record the agent cannot end is one line, the ranks' failure still raised."""
    from types import SimpleNamespace

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from llamafactory_hera.runtime import agent_notes, run_record
    from llamafactory_hera_patches import elastic_agent

    monkeypatch.delenv(agent_notes.NOTES_ENV, raising=False)
    crash = ChildFailedError("launcher.py", {1: ProcessFailure(local_rank=1, pid=7, exitcode=1, error_file="none")})
    config = SimpleNamespace(max_restarts=2, min_nodes=1, max_nodes=1)
    agent_log = logging.getLogger("torch.distributed.elastic.agent.server.api")

    def starts(refusing: str, ends: str) -> Any:
        def original(config: Any, entrypoint: Any, args: Any) -> str:
            for start in ("0", "1", "2"):
                monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", start)
                if start == refusing:
                    assert agent_notes.note_refusal("[llamafactory-hera] error: the line\n")
                quiet = not agent_log.filter(logging.makeLogRecord({"msg": "worker group FAILED"}))
                assert quiet == (refusing == "2" and start == "2")
                if ends == "success" and start == "1":
                    return "ok"
            raise crash

        return original

    assert elastic_agent.launch_agent(starts("0", "success"), config, "python", []) == "ok"
    assert capsys.readouterr().err == ""
    with pytest.raises(ChildFailedError) as raised:
        elastic_agent.launch_agent(starts("0", "crash"), config, "python", [])
    assert raised.value is crash and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as ended:
        elastic_agent.launch_agent(starts("2", "crash"), config, "python", [])
    assert ended.value.code == 1 and capsys.readouterr().err == "[llamafactory-hera] error: the line\n"

    def unwritable(*args: Any) -> None:
        raise OSError("read-only file system")

    def record_named(config: Any, entrypoint: Any, args: Any) -> None:
        assert agent_notes.note(agent_notes.RECORD, "/nowhere/llamafactory_hera_run.json")
        raise crash

    monkeypatch.setattr(run_record, "end_unended", unwritable)
    with pytest.raises(ChildFailedError) as raised:
        elastic_agent.launch_agent(record_named, None, "python", [])
    said = capsys.readouterr().err
    assert raised.value is crash and said.count("\n") == 1 and "read-only file system" in said, said


@pytest.mark.parametrize(("stage", "restarts", "nodes", "switch"), [
    ("harc", 1, (1, 1), "1"),  # a plugin stage that can restart: a store for each start
    ("harc", 0, (1, 2), "1"),  # a node joining restarts the ranks too
    ("harc", 0, (1, 1), None),  # never restarts: torch's default
    ("sft", 1, (1, 1), None),  # a host stage: as without the plugin
])
def test_the_agent_gives_a_restarting_plugin_stage_a_store_for_each_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, restarts: int, nodes: tuple[int, int],
        switch: str | None) -> None:
    """torchrun's, accelerate's and ft_launcher's agent (patches/.../elastic_agent.py) sets
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torch's rendezvous reads it, only where it runs a plugin stage that
    can restart; a value set by hand is kept."""
    from types import SimpleNamespace

    from llamafactory_hera.runtime import agent_notes, elastic
    from llamafactory_hera_patches import elastic_agent

    monkeypatch.delenv(agent_notes.NOTES_ENV, raising=False)
    monkeypatch.delenv(elastic.SWITCH, raising=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "sft", "output_dir": str(tmp_path)}), encoding="utf-8")
    config = SimpleNamespace(max_restarts=restarts, min_nodes=nodes[0], max_nodes=nodes[1])
    seen: list[str | None] = []

    def original(config: Any, entrypoint: Any, args: Any) -> None:
        seen.append(os.environ.get(elastic.SWITCH))

    # torchrun's arguments: python -u launcher.py recipe.yaml key=value
    elastic_agent.launch_agent(original, config, sys.executable, ["-u", "launcher.py", str(recipe), f"stage={stage}"])
    assert seen == [switch]
    monkeypatch.setenv(elastic.SWITCH, "0")
    elastic_agent.launch_agent(original, config, sys.executable, ["-u", "launcher.py", "--stage", stage])
    assert seen == [switch, "0"]


def test_a_rank_0_killed_by_sigkill_leaves_its_run_recorded_failed(harc_assets: Any, tmp_path: Path) -> None:
    """Two torchrun ranks of a HARC run (as ft_launcher's monitor ends a rank it found stopped: SIGKILL, with the same
    elastic agent): rank 0, which writes ``llamafactory_hera_run.json``, is killed once the record says ``running``;
    torchrun's agent ends rank 1 and ends the record ``failed``, naming the rank and the signal. Before: the record
    said ``running`` for good (the killed rank cannot write it; the other ranks do not)."""
    import threading
    import time

    import llamafactory.launcher
    import psutil

    from llamafactory_hera.runtime.run_record import RUN_RECORD, read_record

    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(harc_recipe(harc_assets, "llama3", out, max_steps=50)), encoding="utf-8")
    killed: list[int] = []

    def kill_rank_0_once_running() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if read_record(out / RUN_RECORD).get("status") == "running":
                for proc in psutil.process_iter(["cmdline"]):
                    with contextlib.suppress(psutil.Error):
                        if str(recipe) in (proc.info["cmdline"] or []) and proc.environ().get("RANK") == "0":
                            proc.kill()
                            killed.append(proc.pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank_0_once_running, daemon=True)
    killer.start()
    proc = run_process([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
                        llamafactory.launcher.__file__, str(recipe)],
                       cwd=tmp_path, env=offline_env(tmp_path), timeout=300)
    killer.join(timeout=5)
    assert killed and proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = read_record(out / RUN_RECORD)
    assert record["status"] == "failed", record
    assert record["error"] == ("RuntimeError: rank 0 was killed by SIGKILL, and its launcher ended the ranks before "
                               "the run recorded its end"), record
