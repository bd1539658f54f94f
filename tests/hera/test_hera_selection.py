"""Head selection on the tiny models: exact scores, the select command, auto in training, the report, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from conftest import base_recipe, read_trainer_log, run_train, run_verb
from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.hera.metrics import mutual_knn
from llamafactory_hera.hera.selection import collect
from llamafactory_hera.hera.selection.select import SelectionOptions, prepare, score_head_neighbours
from llamafactory_hera.hera.teacher import load_image_processor, load_teacher, prefetch_workers
from llamafactory_hera.hera.teacher_cache import cache_root
from llamafactory_hera_testing.projection import project_heads

FAMILIES = ("qwen3_vl", "qwen2_5_vl", "llava")


def _options(assets, **kw) -> SelectionOptions:
    return SelectionOptions(**{"num_samples": 24, "k": 5, "teacher": str(assets.teacher), "device": "cpu",
                               "progress": False, "batch_size": 7, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_mutual_knn_of_explicit_contributions(assets, family: str) -> None:
    """Independent reference: one caption at a time (no padding), raw o_proj inputs, every head's contribution
    materialised as a d-wide vector per token, averaged over the caption tokens, then mutual_knn head by head."""
    from llamafactory_hera_patches.tools.model_data import load_model_for_scoring, parse_recipe

    recipe_args = parse_recipe(base_recipe(assets, family, "/unused"))
    options = _options(assets, clamp=0.0)  # the clamped scores: tests/hera/test_hera_selection_reference.py
    pairs, _ = prepare(recipe_args, options)
    got = score_head_neighbours(recipe_args, options, pairs).scores

    model, tokenizer_module, _ = load_model_for_scoring(parse_recipe(base_recipe(assets, family, "/unused")), "cpu")
    tokenizer = tokenizer_module["tokenizer"]
    o_projs = head_projections(model)
    text = model.config.get_text_config()
    heads, head_dim = text.num_attention_heads, getattr(text, "head_dim", None) or text.hidden_size // \
        text.num_attention_heads
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, a[0])) for i, m in o_projs.items()]
    reps = torch.zeros(len(o_projs), heads, len(pairs), text.hidden_size)
    with torch.no_grad():
        for n, pair in enumerate(pairs):
            encoded = tokenizer(pair.caption, return_tensors="pt", return_special_tokens_mask=True)
            keep = ~encoded["special_tokens_mask"][0].bool()
            model.get_decoder()(input_ids=encoded["input_ids"])
            for layer, o_proj in o_projs.items():
                per_token = project_heads(o_proj, seen[layer][0], list(range(heads)), head_dim)  # [H, T, d]
                reps[layer, :, n] = per_token[:, keep].mean(1)
    for handle in hooks:
        handle.remove()
    teacher = load_teacher(str(assets.teacher), "cls", "cpu")
    feats = collect.collect_teacher(teacher, load_image_processor(str(assets.teacher)), pairs, 5, progress=False)
    want = torch.tensor([[mutual_knn(reps[layer, head], feats, 5) for head in range(heads)]
                         for layer in range(len(o_projs))])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got.std() > 0  # not a degenerate all-equal map


def test_teacher_features_with_prefetch_threads_equal_one_image_at_a_time(assets) -> None:
    from llamafactory_hera.hera.teacher import open_image
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
    pairs, _ = prepare(recipe_args, _options(assets))
    teacher = load_teacher(str(assets.teacher), "cls", "cpu")
    processor = load_image_processor(str(assets.teacher))
    with torch.no_grad():
        want = torch.nn.functional.normalize(torch.stack([teacher(processor(
            [open_image(p.images[0])], return_tensors="pt")["pixel_values"])[0] for p in pairs]).float(), dim=-1)
    for workers in (0, 1, 3):  # 3 workers, batches of 4: more batches in flight than a short tail has left
        got = collect.collect_teacher(teacher, processor, pairs, 4, progress=False, workers=workers)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert prefetch_workers(torch.device("cpu")) == 0


def test_multimodal_mode_scores_every_head(assets) -> None:
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
    options = _options(assets, mode="multimodal")
    pairs, _ = prepare(recipe_args, options)
    scores = score_head_neighbours(recipe_args, options, pairs).scores
    assert scores.shape == (2, 4) and bool(((scores >= 0) & (scores <= 1)).all())
    # a validation split shuffles LLaMA-Factory's train_dataset: rows must still meet their own teacher features
    split_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused", val_size=0.25))
    split_pairs, _ = prepare(split_args, options)
    assert [p.row for p in split_pairs] == [p.row for p in pairs]
    torch.testing.assert_close(score_head_neighbours(split_args, options, split_pairs).scores, scores, atol=0, rtol=0)


RECIPE_HEAD = "### model\n# a user's comment that must survive\n"


def _write_recipe(assets, path: Path, family: str = "qwen3_vl", **overrides) -> str:
    recipe = base_recipe(assets, family, path.parent / "out", **overrides)
    recipe.pop("hera_heads", None)
    text = RECIPE_HEAD + yaml.safe_dump(recipe, sort_keys=False) + "hera_heads: auto   # filled by select\n"
    path.write_text(text, encoding="utf-8")
    return text


LOADING_BAR = int(transformers.__version__.split(".")[0]) >= 5  # "Loading weights": transformers 5 draws it, 4 not


def test_select_command_writes_recipe_record_and_heatmap(assets, tmp_path: Path, capfd) -> None:
    recipe = tmp_path / "recipe.yaml"
    before = _write_recipe(assets, recipe)
    proc = run_verb(capfd, "select", recipe, "--samples", "24", "--k", "5", "--heads", "3", "--device", "cpu",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((cache_root() / "selection_passes").iterdir())  # the batches kept for a rerun go once it scored
    after = recipe.read_text(encoding="utf-8")
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith("hera_heads: [")
    assert changed[0][1].endswith("# chosen by `llamafactory-hera select` (was: auto)")  # the auto comment rewritten
    record = json.loads((tmp_path / "recipe.hera_selection.json").read_text())
    heads = yaml.safe_load(after)["hera_heads"]
    assert record["selected"] == heads and len(heads) == 3
    assert len(record["scores"]) == 3 and len(record["scores"][0]) == 4 and len(record["ranking"]) == 12
    assert [r["head"] for r in record["ranking"][:3]] == heads  # worst-3: the three lowest scores
    assert record["settings"]["k"] == 5 and record["identity"]["data_fingerprint"] and record["versions"]["torch"]
    assert record["duration_s"] > 0 and record["num_pairs"] == 24
    assert (tmp_path / "recipe.hera_selection.png").stat().st_size > 1000
    assert "head" in proc.stdout and "MKNN" in proc.stdout and heads[0] in proc.stdout
    assert "the recipe's hera_heads:" not in proc.stdout  # hera_heads: auto, no list of its own to show beside
    assert "%|" in proc.stderr  # the plugin's own progress bars
    # the host's loading output (LLaMA-Factory's and transformers' loggers, their loaders' bars) is in the log
    log = tmp_path / "recipe.hera_selection.log"
    shown = proc.stdout + proc.stderr
    assert shown.count("\n") <= 40 and "llamafactory." not in shown and "Loading weights" not in shown, shown
    assert "llamafactory.data.loader" in log.read_text() and "llamafactory.model.loader" in log.read_text()
    assert "Loading weights" in log.read_text() or not LOADING_BAR  # transformers 5's loading bar
    assert proc.stdout.rstrip().endswith(f"host output (transformers, LLaMA-Factory, warnings): {log} (--verbose "
                                         "prints it here)")

    again = run_verb(capfd, "select", recipe, "--samples", "24", "--k", "5", cwd=tmp_path)
    assert again.returncode == 2 and "already sets hera_heads" in again.stderr and "--force" in again.stderr
    assert "Loading" not in again.stderr  # refused before any model was loaded
    new = tmp_path / "other.yaml"
    third = run_verb(capfd, "select", recipe, "--samples", "24", "--k", "5", "--strategy", "best", "--output", new,
                     "--device", "cpu", "--verbose", cwd=tmp_path)
    assert third.returncode == 0 and recipe.read_text(encoding="utf-8") == after
    verbose = third.stdout + third.stderr  # --verbose: the host's lines as before
    assert "llamafactory.model.loader" in verbose and ("Loading weights" in verbose or not LOADING_BAR)
    assert not (tmp_path / "other.hera_selection.log").exists()
    assert (tmp_path / "other.hera_selection.json").is_file() and yaml.safe_load(new.read_text())["hera_heads"]


def test_select_rejects_bad_input_before_loading(assets, tmp_path: Path, capfd) -> None:
    recipe = tmp_path / "recipe.yaml"
    _write_recipe(assets, recipe)
    proc = run_verb(capfd, "select", recipe, "--strategy", "median", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'median'" in proc.stderr

    small = tmp_path / "small"  # a dataset with fewer usable pairs than k + 1
    shutil.copytree(assets.dataset_dir, small)
    rows = json.loads((small / "hera_demo.json").read_text())
    (small / "hera_demo.json").write_text(json.dumps(rows[:3] + [dict(rows[3], images=[])]))
    _write_recipe(assets, recipe, dataset_dir=str(small))
    proc = run_verb(capfd, "select", recipe, "--k", "5", cwd=tmp_path)
    assert proc.returncode == 2 and "only 3 usable image-caption pairs" in proc.stderr and "at least 6" in proc.stderr

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"  # an architecture without self_attn.o_proj
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.models["qwen2_5_vl"] / name, gpt2 / name)
    _write_recipe(assets, recipe, model_name_or_path=str(gpt2), template="qwen")
    proc = run_verb(capfd, "select", recipe, "--k", "5", cwd=tmp_path)
    assert proc.returncode == 2 and "o_proj" in proc.stderr and str(gpt2) in proc.stderr
    assert "Loading weights" not in proc.stderr + (tmp_path / "recipe.hera_selection.log").read_text()


def test_select_names_a_missing_model_folder_and_a_missing_gpu_before_loading(assets, tmp_path: Path, capfd,
                                                                              monkeypatch) -> None:
    """Unchecked, a mistyped model folder ends in transformers' "Repo id must be in the form 'repo_name' or
    'namespace/repo_name'" traceback, ``--device cuda`` without a GPU in torch's "Found no NVIDIA driver" after the
    data and the teacher had loaded (31 s on the tiny model)."""
    from llamafactory_hera.hera.cli import check_device

    recipe = tmp_path / "recipe.yaml"
    _write_recipe(assets, recipe, model_name_or_path="saves/composed/qwen3_siglip")
    proc = run_verb(capfd, "select", recipe, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        "llamafactory-hera: error: model_name_or_path: saves/composed/qwen3_siglip is not a folder (relative to the "
        f"folder select starts in, {tmp_path}) and not a Hugging Face model id (organisation/name). Correct the path, "
        "or name a model id.")
    assert "Loading weights" not in proc.stderr + (tmp_path / "recipe.hera_selection.log").read_text()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _write_recipe(assets, recipe)
    proc = run_verb(capfd, "select", recipe, "--dry-run", "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr == ("llamafactory-hera: error: --device cuda: no CUDA device is available here (no GPU or "
                           "driver, or CUDA_VISIBLE_DEVICES hides them). Leave --device out (it takes the CPU here) or "
                           "give --device cpu.\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0..cuda:1; "):
        check_device("cuda:2")
    with pytest.raises(ValueError, match=r"^--device gpu: not a device torch knows; give cuda, cuda:N or cpu"):
        check_device("gpu")
    for fine in (None, "cpu", "meta", "cuda", "cuda:1"):
        check_device(fine)


def test_select_refuses_a_file_given_as_the_model_before_loading(assets, tmp_path: Path, capfd) -> None:
    """``select``'s model check is the stages' (recipe/model_paths.py); a file named as the model (here
    the model's config.json, not its folder) is refused in one line before anything loads, as select's own check
    refused it, which the stages' check let through to transformers."""
    recipe = tmp_path / "recipe.yaml"
    config = assets.models["qwen3_vl"] / "config.json"
    _write_recipe(assets, recipe, model_name_or_path=str(config))
    proc = run_verb(capfd, "select", recipe, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        f"llamafactory-hera: error: model_name_or_path: {config} is a file, not a folder ({config}). Point it at the "
        "folder holding the model's config.json and weights, or name a model id.")
    assert "Loading weights" not in proc.stderr + (tmp_path / "recipe.hera_selection.log").read_text()


def test_auto_heads_in_training_cache_report(assets, tmp_path: Path, capfd) -> None:
    cache = tmp_path / "cache"
    runs = []
    for name in ("first", "second"):
        out = tmp_path / name / "out"
        recipe = base_recipe(assets, "qwen2_5_vl", out, hera_heads="auto", hera_select_samples=24, hera_k=5,
                             hera_select_num_heads=2, max_steps=2)
        proc = run_train(recipe, tmp_path / name, env={"LLAMAFACTORY_HERA_CACHE": str(cache)})
        runs.append((out, proc.stdout + proc.stderr))
    (first, log_first), (second, log_second) = runs
    assert "(selected heads;" in log_first and "(reusing cached head selection;" in log_second
    record = json.loads((first / "hera_selection.json").read_text())
    assert len(record["selected"]) == 2
    for out in (first, second):
        assert json.loads((out / "hera_run.json").read_text())["hera_heads"] == record["selected"]
        assert json.loads((out / "hera_state.json").read_text())["heads"] == record["selected"]
        assert (out / "hera_selection.png").is_file()
    losses = [[line["loss"] for line in read_trainer_log(out) if "loss" in line] for out in (first, second)]
    assert losses[0] == losses[1]  # a cached selection trains exactly like a fresh one
    assert len(list(cache.rglob("*.json"))) == 1

    proc = run_verb(capfd, "select", "--report", first, "--samples", "24", "--k", "5", "--device", "cpu",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((first / "hera_report.json").read_text())
    assert report["heads"] == record["selected"] and len(report["before"]) == 2 and len(report["after"]) == 2
    assert [row["head"] for row in report["summary"][:2]] == record["selected"]
    assert (first / "hera_report.png").stat().st_size > 1000 and "delta" in proc.stdout
    shown = proc.stdout + proc.stderr  # the table and the plugin's bars; the host's ~1,000 loading lines: the log
    assert shown.count("\n") <= 40 and "configuration_utils" not in shown, shown
    assert "configuration_utils" in (first / "hera_report.log").read_text()
    assert f"host output (transformers, LLaMA-Factory, warnings): {first / 'hera_report.log'}" in proc.stdout
    # whether each change is real: resolution 1/(24 pairs x k=5), a paired bootstrap interval, the noise marks
    assert report["resolution"] == pytest.approx(1 / 120) and report["bootstrap"]["resamples"] == 1000
    shape = [len(row) for row in report["before"]]
    assert [len(row) for row in report["delta_ci_low"]] == [len(row) for row in report["within_noise"]] == shape
    for row in report["summary"]:
        assert row["ci_low"] <= row["ci_high"] and row["change"] in ("within noise", "beyond noise")
    assert "resolution: 1/(24 pairs x k=5) = 0.0083" in proc.stdout and "within noise" in proc.stdout


def test_report_needs_a_hera_run(tmp_path: Path, capfd) -> None:
    proc = run_verb(capfd, "select", "--report", tmp_path, cwd=tmp_path)
    assert proc.returncode == 2 and "has no hera_run.json" in proc.stderr
    proc = run_verb(capfd, "select", "--report", tmp_path, "--bootstrap", "10", cwd=tmp_path)
    assert proc.returncode == 2 and "--bootstrap: 10; give at least 100 resamples" in proc.stderr


def test_auto_heads_under_torchrun_are_chosen_once_and_shared(assets, tmp_path: Path) -> None:
    """Two ranks: rank 0 selects (multimodal mode: LLaMA-Factory's data pipeline with its barriers), the other
    rank receives the heads by broadcast; both train the same heads. With the eval extra's wandb and scikit-learn
    importable, as a user who installed ``.[eval]`` has them (the suite's other multi-process runs hide them)."""
    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, hera_heads="auto", hera_select_samples=24, hera_k=5,
                         hera_select_mode="multimodal", hera_select_num_heads=3, per_device_train_batch_size=6,
                         max_steps=2)
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "LLAMAFACTORY_HERA_CACHE": str(tmp_path / "c")}
    proc = run_train(recipe, tmp_path, env=env, eval_extra=True)
    assert (proc.stdout + proc.stderr).count("hera_heads: auto ->") == 1  # rank 0 only
    record = json.loads((out / "hera_selection.json").read_text())
    assert record["settings"]["mode"] == "multimodal" and len(record["selected"]) == 3
    assert json.loads((out / "hera_state.json").read_text())["heads"] == record["selected"]
    assert all("hera_loss" in line for line in read_trainer_log(out) if "loss" in line)


def test_dry_run_shows_the_recipes_own_heads_beside_the_choice() -> None:
    """``select --dry-run``, the paper's heads in the recipe: each one's MKNN and rank, or that the model lacks it."""
    from types import SimpleNamespace

    from llamafactory_hera.hera.selection.command import heads_table

    result = SimpleNamespace(scores=[[0.4, 0.1], [0.3, 0.2]], ranking=[{"head": h} for h in ("L0H1", "L1H1", "L1H0",
                                                                                             "L0H0")])
    table = heads_table(["l1h0", "L13H12"], result)
    lines = table.splitlines()
    assert any("l1h0" in line and "0.3" in line and "3/4" in line for line in lines), table
    assert any("L13H12" in line and "not in this model" in line for line in lines), table

