"""LLaVA's data as it is downloaded: the shipped ``dataset_info.json`` entries read LLaVA's own files through
LLaMA-Factory's loader (images joined with ``media_dir``), ``data convert`` writes the one change the loader needs,
and ``data check`` counts rows and images, exiting non-zero with the first missing paths."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, base_recipe, read_trainer_log, run_train
from llamafactory_hera import cli
from llamafactory_hera_testing.llava_data import keep_loadable_rows, write_tree

SHIPPED_INFO = REPO / "recipes" / "data" / "dataset_info.json"
NAMES = ("llava_pretrain_558k", "llava_v1_5_mix665k")


@pytest.fixture
def tree(tmp_path: Path) -> SimpleNamespace:
    return write_tree(tmp_path, SHIPPED_INFO)


def write_recipe(tree: SimpleNamespace, tmp_path: Path, name: str = "stage.yaml", **keys: object) -> Path:
    """A stage: hera recipe as the LLaVA stage recipes set it (the model is never loaded by data check)."""
    recipe = {"model_name_or_path": str(tmp_path / "composed_model"), "stage": "hera", "do_train": True,
              "finetuning_type": "full", "template": "llava", "dataset_dir": str(tree.data),
              "cache_dir": str(tmp_path / "hf_cache"), "output_dir": str(tmp_path / "run"), "hera_heads": ["L0H0"],
              **keys}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}))
    return path


def hera(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    """The verb in this process, through the real parser and dispatcher: exit code, stdout, stderr."""
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(out: str) -> dict[str, dict[str, str]]:
    """The table's rows by dataset: column -> cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dataset "))
    header = [cell.strip() for cell in lines[start].split("  ") if cell.strip()]
    rows = {}
    for line in lines[start + 2:]:
        cells = [cell.strip() for cell in line.split("  ") if cell.strip()]
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_the_shipped_entries_read_llavas_files_through_llamafactorys_loader(tree, tmp_path) -> None:
    """LLaMA-Factory's parser and loader read the 558k file as it is downloaded, and the mixture once converted:
    images joined with media_dir, text-only rows without images, LLaVA's roles as user and assistant."""
    from llamafactory.data.loader import _get_merged_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    from llamafactory_hera.llava.data_convert import convert_file

    convert_file(tree.mixture)
    attrs = get_dataset_list(list(NAMES), str(tree.data))
    assert [(a.load_from, a.formatting, a.messages, a.images, a.role_tag, a.user_tag, a.assistant_tag)
            for a in attrs] == [("file", "sharegpt", "conversations", "image", "from", "human", "gpt")] * 2
    model_args = SimpleNamespace(cache_dir=str(tmp_path / "hf_cache"), hf_hub_token=None)
    training_args = SimpleNamespace(local_process_index=0, seed=0, dataloader_num_workers=0)
    for name, media_dir in (("llava_pretrain_558k", tree.pretrain / "images"), ("llava_v1_5_mix665k", tree.llava)):
        rows = _get_merged_dataset([name], model_args, DataArguments(dataset_dir=str(tree.data),
                                                                     media_dir=str(media_dir)),
                                   training_args, stage="sft")
        source = json.loads((tree.pretrain / "blip_laion_cc_sbu_558k.json" if name == NAMES[0] else
                             tree.converted).read_text())
        assert len(rows) == len(source), name
        for row, raw in zip(rows, source, strict=True):
            joined = media_dir / raw.get("image", "-")  # a file missing there: the loader keeps the path as written
            want = None if "image" not in raw else [str(joined)] if joined.is_file() else [raw["image"]]
            assert row["_images"] == want, (name, raw)
            assert [m["role"] for m in row["_prompt"] + row["_response"]] == \
                ["user", "assistant"] * (len(raw["conversations"]) // 2)
            assert row["_response"][0]["content"] == raw["conversations"][-1]["value"]


def test_check_counts_a_complete_558k_style_dataset(tree, tmp_path, capsys) -> None:
    recipe = write_recipe(tree, tmp_path, dataset="llava_pretrain_558k", media_dir=str(tree.pretrain / "images"),
                          streaming=True)  # counted all the same
    code, out, err = hera(capsys, "data", "check", recipe)
    assert code == 0, err
    assert table(out)["llava_pretrain_558k"] == {
        "dataset": "llava_pretrain_558k", "rows": "3", "dropped": "0", "text-only": "0", "<image> mismatch": "0",
        "usable by HeRA": "3", "images": "3", "missing": "0", "unreadable": "0"}
    assert "images per row (llava_pretrain_558k): 1: 3" in out
    assert "text-only rows" not in out and "first missing" not in out
    assert f"media_dir: {tree.pretrain / 'images'}; images checked by stat" in out


def test_check_of_the_mixture_exits_non_zero_with_the_first_missing_paths(tree, tmp_path, capsys) -> None:
    """Stat only by default: the missing and the empty file fail, the corrupt one passes until --verify-images."""
    from llamafactory_hera.llava.data_convert import convert_file

    convert_file(tree.mixture)
    recipe = write_recipe(tree, tmp_path, dataset="llava_v1_5_mix665k", media_dir=str(tree.llava))
    code, out, err = hera(capsys, "data", "check", recipe, "--workers", "2")
    assert code == 2
    assert table(out)["llava_v1_5_mix665k"] == {
        "dataset": "llava_v1_5_mix665k", "rows": "9", "dropped": "0", "text-only": "2", "<image> mismatch": "0",
        "usable by HeRA": "5", "images": "6", "missing": "1", "unreadable": "1"}
    assert "images per row (llava_v1_5_mix665k): 0: 2 · 1: 7" in out
    assert "text-only rows: HeRA trains them with the LM loss alone" in out
    listed = out.split("first missing or unreadable images (2 of 2):\n", 1)[1].splitlines()
    assert listed == [f"  missing     {tree.llava / 'ocr_vqa/images/B00000J0AD.jpg'}",
                      f"  unreadable  {tree.llava / 'textvqa/train_images/empty.jpg'}"]
    assert err.splitlines()[-1] == ("llamafactory-hera: error: data check: 2 images are missing or unreadable (listed "
                                    "above); the run would stop at the first. Download the missing files "
                                    "(docs/llava-data.md), or remove those rows from the dataset.")

    code, out, _ = hera(capsys, "data", "check", recipe, "--verify-images")
    assert code == 2
    assert {k: table(out)["llava_v1_5_mix665k"][k] for k in ("usable by HeRA", "missing", "unreadable")} == \
        {"usable by HeRA": "4", "missing": "1", "unreadable": "2"}
    assert f"  unreadable  {tree.llava / 'vg/VG_100K/corrupt.jpg'}" in out
    assert "images checked by opened, verified and decoded by PIL" in out


def test_rows_whose_image_marks_differ_from_their_images_fail_the_check(tree, tmp_path, capsys) -> None:
    """LLaMA-Factory's multimodal templates stop the run at a row whose <image> marks are not one per image."""
    captions = json.loads((tree.pretrain / "blip_laion_cc_sbu_558k.json").read_text())
    captions[1]["conversations"][0]["value"] = "No mark here."
    captions[2]["conversations"][0]["value"] += " <image>"
    (tree.pretrain / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(captions))
    recipe = write_recipe(tree, tmp_path, dataset="llava_pretrain_558k", media_dir=str(tree.pretrain / "images"))
    code, out, err = hera(capsys, "data", "check", recipe)
    assert code == 2
    assert {k: table(out)["llava_pretrain_558k"][k] for k in ("<image> mismatch", "usable by HeRA")} == \
        {"<image> mismatch": "2", "usable by HeRA": "1"}
    assert "llava_pretrain_558k has 2 rows whose <image> marks differ from their images (first rows: 1, 2)" in \
        err.splitlines()[-1]


def test_image_marks_are_counted_in_every_turn(tree, tmp_path, capsys) -> None:
    """LLaMA-Factory's template counts the <image> marks of the whole conversation: a mark in a later turn is the
    row's image (row 0 matches), and one there beside the first turn's is one too many (row 1 does not)."""
    from llamafactory_hera_testing.llava_data import turn

    captions = json.loads((tree.pretrain / "blip_laion_cc_sbu_558k.json").read_text())
    captions[0]["conversations"] = [turn("human", "Hi."), turn("gpt", "Hello."),
                                    turn("human", "<image>\nWhat is it?"), turn("gpt", "A green square.")]
    captions[1]["conversations"] = [turn("human", "<image>\nWhat is it?"), turn("gpt", "A green square."),
                                    turn("human", "And this? <image>"), turn("gpt", "The same square.")]
    (tree.pretrain / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(captions))
    recipe = write_recipe(tree, tmp_path, dataset="llava_pretrain_558k", media_dir=str(tree.pretrain / "images"))
    code, out, err = hera(capsys, "data", "check", recipe)
    assert code == 2
    assert {k: table(out)["llava_pretrain_558k"][k] for k in ("<image> mismatch", "usable by HeRA")} == \
        {"<image> mismatch": "1", "usable by HeRA": "2"}
    assert "llava_pretrain_558k has 1 rows whose <image> marks differ from their images (first rows: 1)" in \
        err.splitlines()[-1]


def test_images_under_a_relative_media_dir_are_listed_where_the_run_opens_them(tree, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    """With the recipes' relative media_dir (recipes/data/llava), a file LLaMA-Factory found (the empty
    one) was listed with the folder twice, data/llava/data/llava/..., as its path already holds it."""
    from llamafactory_hera.llava.data_convert import convert_file

    convert_file(tree.mixture)
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tree, tmp_path, dataset="llava_v1_5_mix665k", dataset_dir="data", media_dir="data/llava")
    code, out, _ = hera(capsys, "data", "check", recipe, "--workers", "2")
    assert code == 2
    listed = out.split("first missing or unreadable images (2 of 2):\n", 1)[1].splitlines()
    assert listed == ["  missing     data/llava/ocr_vqa/images/B00000J0AD.jpg",
                      "  unreadable  data/llava/textvqa/train_images/empty.jpg"]


def test_convert_writes_string_ids_beside_the_source_once(tree, capsys) -> None:
    original = tree.mixture.read_bytes()
    code, out, _ = hera(capsys, "data", "convert", tree.mixture)
    assert code == 0 and out == (f"wrote {tree.converted}: 9 rows, 2 ids made strings (LLaMA-Factory's JSON loader "
                                 "needs one type per column); images and conversations unchanged\n")
    rows, source = json.loads(tree.converted.read_text()), json.loads(original)
    assert [row["id"] for row in rows] == [str(row["id"]) for row in source]
    assert [{k: v for k, v in row.items() if k != "id"} for row in rows] == \
        [{k: v for k, v in row.items() if k != "id"} for row in source]
    assert tree.mixture.read_bytes() == original
    written = tree.converted.stat().st_mtime_ns
    code, out, _ = hera(capsys, "data", "convert", tree.mixture)
    assert code == 0 and out.startswith(f"up to date, nothing written: {tree.converted}: 9 rows")
    assert tree.converted.stat().st_mtime_ns == written


def test_each_user_error_is_one_line_naming_the_key_and_the_fix(tree, tmp_path, capsys) -> None:
    images = str(tree.pretrain / "images")
    no_info = tmp_path / "no_info"
    no_info.mkdir()
    cases = {
        "no recipe": (["data", "check", tmp_path / "nope.yaml"], f"recipe {tmp_path / 'nope.yaml'} does not exist"),
        "no dataset": (["data", "check", write_recipe(tree, tmp_path, "a.yaml")],
                       "dataset: " + str(tmp_path / "a.yaml") + " names no dataset; data check reads the datasets a "
                       "recipe trains on. Add dataset: llava_pretrain_558k (stage 1)"),
        "unknown dataset": (["data", "check", write_recipe(tree, tmp_path, "b.yaml", dataset="llava_pretrain_585k")],
                            "dataset: dataset 'llava_pretrain_585k' is not in " + str(tree.data / "dataset_info.json")
                            + " (it lists: "),
        "no dataset_info.json": (["data", "check", write_recipe(tree, tmp_path, "c.yaml", dataset="llava_v1_5_mix665k",
                                                                dataset_dir=str(no_info))],
                                 "Set dataset_dir to the folder holding dataset_info.json."),
        "file not downloaded": (["data", "check", write_recipe(tree, tmp_path, "d.yaml", dataset="llava_v1_5_mix665k")],
                                f"{tree.data / 'llava/llava_v1_5_mix665k.string_ids.json'} does not exist. Put the "
                                "file there"),
        "media_dir": (["data", "check", write_recipe(tree, tmp_path, "e.yaml", dataset="llava_pretrain_558k",
                                                     media_dir=str(tmp_path / "images"))],
                      f"media_dir: {tmp_path / 'images'} is not a folder; set media_dir to the folder LLaVA's image "
                      "paths are relative to: recipes/data/llava/LLaVA-Pretrain/images for llava_pretrain_558k"),
        "workers": (["data", "check", write_recipe(tree, tmp_path, "f.yaml", dataset="llava_pretrain_558k",
                                                   media_dir=images), "--workers", "0"],
                    "data check: --workers must be at least 1, got 0."),
        "convert: no source": (["data", "convert", tmp_path / "none.json"], f"data convert: {tmp_path / 'none.json'} "
                               "does not exist; give the path of LLaVA's JSON file"),
        "convert: not LLaVA": (["data", "convert", SHIPPED_INFO, "--output", tmp_path / "x.json"],
                               f"data convert: {SHIPPED_INFO} is not a LLaVA data file"),
        "convert: onto the source": (["data", "convert", tree.mixture, "--output", tree.mixture],
                                     f"data convert: --output {tree.mixture} is the source file; the source is never "
                                     "overwritten."),
    }
    for case, (argv, message) in cases.items():
        code, _, err = hera(capsys, *argv)
        assert code == 2 and err.startswith("llamafactory-hera: error: ") and message in err, (case, err)
        assert err.count("\n") == 1, (case, err)


def test_a_file_llamafactory_cannot_load_names_the_conversion(tree, tmp_path, capsys) -> None:
    """LLaVA's mixture as downloaded (integer ids beside string ones) stops LLaMA-Factory's loader; the check names
    the converter instead of the loader's traceback."""
    info = json.loads((tree.data / "dataset_info.json").read_text())
    info["as_downloaded"] = {**info["llava_v1_5_mix665k"], "file_name": "llava/llava_v1_5_mix665k.json"}
    (tree.data / "dataset_info.json").write_text(json.dumps(info))
    recipe = write_recipe(tree, tmp_path, dataset="as_downloaded", media_dir=str(tree.llava))
    code, out, err = hera(capsys, "data", "check", recipe)
    assert code == 2 and "usable by HeRA" not in out
    error = err.splitlines()[-1]  # after the host's loading progress
    assert error.startswith("llamafactory-hera: error: dataset: as_downloaded: LLaMA-Factory's loader cannot read its "
                            "file_name llava/llava_v1_5_mix665k.json (")
    assert "column id" in error and "run `llamafactory-hera data convert` on it" in error


def test_convert_replaces_a_different_output_only_with_force(tree, tmp_path, capsys) -> None:
    tree.converted.write_text("[]")
    code, _, err = hera(capsys, "data", "convert", tree.mixture)
    assert code == 2 and err == (f"llamafactory-hera: error: data convert: {tree.converted} exists and differs "
                                 f"from this conversion of {tree.mixture}; --force replaces it (or give another "
                                 "--output).\n")
    assert tree.converted.read_text() == "[]"
    assert hera(capsys, "data", "convert", tree.mixture, "--force")[0] == 0
    assert len(json.loads(tree.converted.read_text())) == 9


def test_hera_trains_a_tiny_llava_on_the_mixture_with_its_text_only_rows(assets, tree, tmp_path, capsys) -> None:
    """The shipped 665k entry, checked and then trained under stage: hera through LLaMA-Factory's run (template
    llava: LLaVA's <image> marks expand to the image tokens): the text-only rows get the LM loss only, no failure."""
    from llamafactory_hera.llava.data_convert import convert_file

    keep_loadable_rows(tree.mixture)
    convert_file(tree.mixture)
    keys = {"dataset": "llava_v1_5_mix665k", "dataset_dir": str(tree.data), "media_dir": str(tree.llava)}
    # hera_k 2: the 4 image rows hold 3 distinct images (two rows share one), so a set holds at most 3
    recipe = base_recipe(assets, "llava", tmp_path / "out", max_steps=2, per_device_train_batch_size=6, hera_k=2,
                         **keys)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = hera(capsys, "data", "check", tmp_path / "recipe.yaml")
    assert code == 0, err
    assert {k: table(out)["llava_v1_5_mix665k"][k] for k in ("rows", "text-only", "usable by HeRA")} == \
        {"rows": "6", "text-only": "2", "usable by HeRA": "4"}
    run_train(recipe, tmp_path)
    lines = [line for line in read_trainer_log(tmp_path / "out") if "loss" in line]
    assert len(lines) == 2 and sum(line["hera_text_only_samples"] for line in lines) > 0
    assert sum(line["hera_image_samples"] for line in lines) > 0
