"""Writing selected heads into hand-written recipes (byte-exact, atomic) and the selection figures and tables."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from llamafactory_hera.anatomy.head_plots import format_head_table, plot_before_after, plot_head_heatmap
from llamafactory_hera.anatomy.recipe_edit import (
    HeadsExistError,
    read_heads_entry,
    set_hera_heads,
    update_recipe,
    write_text_atomic,
)

HEADS = ["L13H12", "L7H6"]
NEW = "hera_heads: [L13H12, L7H6]"

# A recipe as people write them: section headers, inline comments, blank lines, quoting, a commented-out entry.
# {entry} is where the hera_heads entry goes (its lines, each ending with a newline, or nothing).
RECIPE = """\
### model
model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct  # the student
image_max_pixels: 262144
trust_remote_code: true

### method
stage: hera
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### hera
{entry}hera_teacher: "facebook/dinov2-large"   # DINOv2-L, CLS token
# hera_heads: [L0H0]   (an old choice, kept as a comment)
hera_lambda: 0.01

### dataset
dataset: 'mllm_demo, identity'
template: qwen2_vl
cutoff_len: 2048

### output
output_dir: saves/qwen2_5vl-7b/lora/hera
save_strategy: 'no'
report_to: none  # choices: [none, wandb, tensorboard]

### train
learning_rate: 1.0e-4
"""

# (existing entry, the entry set_hera_heads must leave in its place)
FORMS = {
    "flow": ("hera_heads: [L1H0, L1H2]\n", NEW + "\n"),
    "flow_quoted_with_comment": ("hera_heads: ['L1H0', \"L1H2\"]  # from select\n", NEW + "  # from select\n"),
    "flow_multiline": ("hera_heads: [L1H0,\n  L1H2,   # strongest]\n  L3H4]\n", NEW + "\n"),
    "flow_multiline_closing_at_column_0": ("hera_heads: [  # by hand\n  L1H0,\n  L1H2,\n]\n",
                                           NEW + "  # by hand\n"),
    "flow_on_next_line": ("hera_heads:\n  [L1H0, L1H2]\n", NEW + "\n"),
    "flow_empty": ("hera_heads: []\n", NEW + "\n"),
    "block_column_0": ("hera_heads:\n- L1H0\n- L1H2\n", NEW + "\n"),
    "block_with_comments": ("hera_heads:    # picked by hand\n  # strongest first\n  - L1H0\n\n  # runner-up\n"
                            "  - 'L1H2'  # weak\n", NEW + "    # picked by hand\n"),
    "auto": ("hera_heads: auto\n", NEW + "\n"),
    "auto_single_quoted_with_comment": ("hera_heads: 'auto'  # let select decide\n",
                                        NEW + "  # chosen by `llamafactory-hera select` (was: auto)\n"),
    "auto_double_quoted": ('hera_heads: "auto"\n', NEW + "\n"),
    "null": ("hera_heads:\n", NEW + "\n"),
    "scalar_with_hash_in_quotes": ("hera_heads: 'a # b'   # note\n", NEW + "   # note\n"),
}


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def _assert_same_mapping_but_heads(original: str, result: str, heads: list[str]) -> None:
    expected = yaml.safe_load(original) or {}
    expected["hera_heads"] = heads
    assert yaml.safe_load(result) == expected


@pytest.mark.parametrize("eol", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("form", FORMS, ids=list(FORMS))
def test_set_hera_heads_replaces_only_the_entry(form: str, eol: str) -> None:
    entry, replaced = FORMS[form]
    original = RECIPE.format(entry=entry).replace("\n", eol)
    expected = RECIPE.format(entry=replaced).replace("\n", eol)
    result = set_hera_heads(original, HEADS)
    assert _lines(result) == _lines(expected)
    assert result == expected
    _assert_same_mapping_but_heads(original, result, HEADS)
    assert read_heads_entry(result) == HEADS
    assert set_hera_heads(result, HEADS) == result  # idempotent


@pytest.mark.parametrize("eol", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_absent_entry_goes_after_stage(eol: str) -> None:
    original = RECIPE.format(entry="").replace("\n", eol)
    result = set_hera_heads(original, HEADS)
    expected = original.replace(f"stage: hera{eol}", f"stage: hera{eol}{NEW}{eol}")
    assert _lines(result) == _lines(expected)
    _assert_same_mapping_but_heads(original, result, HEADS)


@pytest.mark.parametrize("eol", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_absent_entry_without_stage_is_appended(eol: str) -> None:
    original = RECIPE.format(entry="").replace("stage: hera\n", "").replace("\n", eol)
    assert set_hera_heads(original, HEADS) == original + NEW + eol
    without_final_newline = original.rstrip("\r\n")
    result = set_hera_heads(without_final_newline, HEADS)
    assert result == without_final_newline + eol + NEW + eol
    _assert_same_mapping_but_heads(original, result, HEADS)
    assert set_hera_heads("", HEADS) == NEW + "\n"


def test_stage_as_last_line_without_newline() -> None:
    assert set_hera_heads("do_train: true\nstage: hera", HEADS) == f"do_train: true\nstage: hera\n{NEW}\n"


@pytest.mark.parametrize("entry", ["hera_heads: auto", "hera_heads: [L1H0,\n  L1H2]", "hera_heads:\n- L1H0\n- L1H2",
                                   "hera_heads:  # mine\n  - L1H0"])
def test_entry_at_the_end_of_a_file_without_final_newline(entry: str) -> None:
    original = "stage: hera\n\n# heads\n" + entry
    result = set_hera_heads(original, HEADS)
    comment = "  # mine" if "# mine" in entry else ""
    assert result == f"stage: hera\n\n# heads\n{NEW}{comment}"
    _assert_same_mapping_but_heads(original, result, HEADS)


def test_only_the_top_level_key_counts() -> None:
    original = "stage: hera\nhera_heads_note: keep\nextra:\n  hera_heads: [L0H0]\n# hera_heads: [L9H9]\n"
    result = set_hera_heads(original, HEADS)
    assert result == f"stage: hera\n{NEW}\nhera_heads_note: keep\nextra:\n  hera_heads: [L0H0]\n# hera_heads: [L9H9]\n"
    _assert_same_mapping_but_heads(original, result, HEADS)


def test_heads_are_validated_and_normalised() -> None:
    assert set_hera_heads("stage: hera\n", ["l7h6", " L13H12 "]) == "stage: hera\nhera_heads: [L7H6, L13H12]\n"
    with pytest.raises(ValueError, match="L<layer>H<head>"):
        set_hera_heads("stage: hera\n", ["L1H2, L3H4"])


def test_duplicate_entry_is_refused() -> None:
    with pytest.raises(ValueError, match="appears 2 times"):
        set_hera_heads("hera_heads: auto\nstage: hera\nhera_heads: [L0H0]\n", HEADS)


def test_read_heads_entry() -> None:
    assert read_heads_entry("stage: hera\nhera_heads: [L1H0, 'L1H2']\n") == ["L1H0", "L1H2"]
    assert read_heads_entry("hera_heads:\n  - L1H0  # c\n") == ["L1H0"]
    assert read_heads_entry("hera_heads: auto  # c\n") == "auto"
    assert read_heads_entry("hera_heads: []\n") == []
    assert read_heads_entry("stage: hera\n") is None
    assert read_heads_entry("") is None


# ---------------------------------------------------------------------------------------------- update_recipe


def _recipe(tmp_path: Path, entry: str, eol: str = "\n", name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(RECIPE.format(entry=entry).replace("\n", eol).encode())
    return path


def test_update_refuses_explicit_heads_without_force(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "hera_heads: [L1H0, L1H2]\n")
    before = path.read_bytes()
    with pytest.raises(HeadsExistError) as err:
        update_recipe(path, HEADS)
    message = str(err.value)
    assert str(path) in message and "[L1H0, L1H2]" in message and "--force" in message and "--output" in message
    assert path.read_bytes() == before
    assert update_recipe(path, HEADS, force=True) == path
    assert path.read_bytes() == RECIPE.format(entry=NEW + "\n").encode()


@pytest.mark.parametrize("entry", ["hera_heads: auto\n", "hera_heads: 'AUTO'\n", "hera_heads: []\n", "hera_heads:\n",
                                   ""])
def test_update_replaces_auto_empty_or_absent_without_force(tmp_path: Path, entry: str) -> None:
    path = _recipe(tmp_path, entry)
    update_recipe(path, HEADS)
    assert read_heads_entry(path.read_text()) == HEADS


def test_update_keeps_crlf(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "hera_heads:\n- L1H0\n", eol="\r\n")
    update_recipe(path, HEADS, force=True)
    assert path.read_bytes() == _crlf(RECIPE.format(entry=NEW + "\n")).encode()


def test_update_to_output_leaves_the_source_alone(tmp_path: Path) -> None:
    source = _recipe(tmp_path, "hera_heads: [L1H0]\n")  # explicit heads in the source do not block a copy
    source.chmod(0o640)
    before = source.read_bytes()
    output = tmp_path / "selected.yaml"
    assert update_recipe(source, HEADS, output=output) == output
    assert source.read_bytes() == before
    assert output.read_bytes() == RECIPE.format(entry=NEW + "\n").encode()
    assert stat.S_IMODE(output.stat().st_mode) == 0o640

    output.write_text("stage: hera\nhera_heads: [L2H2]\n")
    with pytest.raises(FileExistsError) as err:
        update_recipe(source, ["L3H3"], output=output)
    assert str(output) in str(err.value) and "--force" in str(err.value)
    assert output.read_text() == "stage: hera\nhera_heads: [L2H2]\n"
    update_recipe(source, ["L3H3"], output=output, force=True)
    assert read_heads_entry(output.read_text()) == ["L3H3"]
    assert source.read_bytes() == before


# ------------------------------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_the_original_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           failing: str) -> None:
    path = _recipe(tmp_path, "hera_heads: auto\n")
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        update_recipe(path, HEADS)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o664])
def test_write_keeps_permission_bits(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("stage: hera\n")
    path.chmod(mode)
    write_text_atomic(path, "stage: hera\nhera_heads: [L0H0]\r\n")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_bytes() == b"stage: hera\nhera_heads: [L0H0]\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_write_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text("stage: hera\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    update_recipe(link, HEADS)
    assert link.is_symlink()
    assert real.read_text() == f"stage: hera\n{NEW}\n"


# ------------------------------------------------------------------------------------------- plots and tables


@pytest.mark.parametrize("shape,selected", [((6, 8), [(1, 0), (1, 2)]),
                                            ((40, 40), [(13, 12), (7, 6), (13, 13), (14, 12), (39, 39)])],
                         ids=["6x8", "40x40"])
def test_plots_write_png(tmp_path: Path, shape: tuple[int, int], selected: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(0)
    before = rng.uniform(0.0, 0.4, shape)
    after = np.clip(before + rng.normal(0.0, 0.05, shape), 0.0, 1.0)
    for path in (plot_head_heatmap(before, selected, tmp_path / "sub" / "heatmap.png", "MKNN per head"),
                 plot_before_after(before, after, selected, tmp_path / "before_after.png", "Before vs after")):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024


def test_plots_reject_heads_outside_the_map(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="L6H0 is outside"):
        plot_head_heatmap(np.zeros((6, 8)), [(6, 0)], tmp_path / "x.png", "x")
    with pytest.raises(ValueError, match="same"):
        plot_before_after(np.zeros((6, 8)), np.zeros((6, 7)), [], tmp_path / "x.png", "x")


def test_format_head_table() -> None:
    rows: list[dict[str, object]] = [{"rank": 1, "head": "L13H12", "layer": 13, "mknn": 0.41234567},
                                     {"rank": 2, "head": "L7H6", "layer": 7, "mknn": 0.3}]
    expected = (
        "rank  head    layer    mknn\n"
        "----  ------  -----  ------\n"
        "   1  L13H12     13  0.4123\n"
        "   2  L7H6        7  0.3000"
    )
    assert format_head_table(rows, ["rank", "head", "layer", "mknn"]) == expected
