"""Writing selected heads into hand-written recipes (comments and key order kept, nothing overwritten silently)
and the selection figures and tables."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from llamafactory_hera.hera.selection.recipe_write import (
    HeadsExistError,
    check_writable,
    set_hera_heads,
    update_recipe,
)
from llamafactory_hera.plots.heads import format_head_table, plot_before_after, plot_head_heatmap

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

# the forms an existing entry takes (its lines), each replaced by the one line `hera_heads: [L13H12, L7H6]`
FORMS = {
    "flow": "hera_heads: [L1H0, L1H2]\n",
    "flow_multiline": "hera_heads: [L1H0,\n  L1H2,   # strongest]\n  L3H4]\n",
    "flow_on_next_line": "hera_heads:\n  [L1H0, L1H2]\n",
    "block": "hera_heads:\n- L1H0\n- 'L1H2'\n",
    "auto": "hera_heads: auto\n",
    "auto_quoted": 'hera_heads: "auto"\n',
    "null": "hera_heads:\n",
    "absent": "",
}


def _same_mapping_but_heads(original: str, result: str, heads: list[str]) -> bool:
    return yaml.safe_load(result) == {**(yaml.safe_load(original) or {}), "hera_heads": heads}


@pytest.mark.parametrize("form", FORMS, ids=list(FORMS))
def test_only_the_heads_change_comments_and_order_stay(form: str) -> None:
    original = RECIPE.format(entry=FORMS[form])
    result = set_hera_heads(original, HEADS)
    lines = result.splitlines()
    heads_line = lines.index(NEW)
    assert lines[:heads_line] + lines[heads_line + 1:] == RECIPE.format(entry="").splitlines()
    if form == "absent":  # a new entry goes after stage:
        assert lines[heads_line - 1] == "stage: hera"
    assert _same_mapping_but_heads(original, result, HEADS)
    assert set_hera_heads(result, HEADS) == result  # idempotent


def test_the_comment_on_the_heads_line_is_kept() -> None:
    result = set_hera_heads(RECIPE.format(entry="hera_heads: ['L1H0', \"L1H2\"]  # from select\n"), HEADS)
    line = next(line for line in result.splitlines() if line.startswith("hera_heads:"))
    assert line.startswith(NEW) and line.endswith("# from select")


def test_a_comment_that_described_auto_says_where_the_heads_came_from() -> None:
    result = set_hera_heads("stage: hera\nhera_heads: 'auto'  # let select decide\n#   (continued)\nk: 1\n", HEADS)
    assert result.splitlines()[1].startswith(NEW)
    assert result.splitlines()[1].endswith("# chosen by `llamafactory-hera select` (was: auto)")
    assert "#   (continued)" in result  # a comment line at column 0 belongs to what follows and stays


def test_without_stage_the_entry_is_appended() -> None:
    assert set_hera_heads("do_train: true  # yes\nlr: 1.0e-4", HEADS) == f"do_train: true  # yes\nlr: 1.0e-4\n{NEW}\n"
    assert set_hera_heads("", HEADS) == NEW + "\n"


def test_only_the_top_level_key_counts() -> None:
    original = "stage: hera\nhera_heads_note: keep\nextra:\n  hera_heads: [L0H0]\n# hera_heads: [L9H9]\n"
    result = set_hera_heads(original, HEADS)
    assert result == f"stage: hera\n{NEW}\nhera_heads_note: keep\nextra:\n  hera_heads: [L0H0]\n# hera_heads: [L9H9]\n"


def test_heads_are_validated_and_normalised() -> None:
    assert set_hera_heads("stage: hera\n", ["l7h6", " L13H12 "]) == "stage: hera\nhera_heads: [L7H6, L13H12]\n"
    with pytest.raises(ValueError, match="L<layer>H<head>"):
        set_hera_heads("stage: hera\n", ["L1H2, L3H4"])


def test_a_recipe_that_is_not_a_mapping_or_repeats_a_key_is_refused() -> None:
    with pytest.raises(ValueError, match="not valid YAML"):
        set_hera_heads("hera_heads: auto\nstage: hera\nhera_heads: [L0H0]\n", HEADS)
    with pytest.raises(ValueError, match="mapping"):
        set_hera_heads("- stage: hera\n", HEADS)


# ---------------------------------------------------------------------------------------------- update_recipe


def _recipe(tmp_path: Path, entry: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(RECIPE.format(entry=entry))
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
    assert path.read_text() == RECIPE.format(entry=NEW + "\n")


@pytest.mark.parametrize("entry", ["hera_heads: auto\n", "hera_heads: 'AUTO'\n", "hera_heads: []\n", "hera_heads:\n",
                                   ""])
def test_update_replaces_auto_empty_or_absent_without_force(tmp_path: Path, entry: str) -> None:
    path = _recipe(tmp_path, entry)
    update_recipe(path, HEADS)
    assert yaml.safe_load(path.read_text())["hera_heads"] == HEADS


def test_update_refuses_a_read_only_recipe(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "hera_heads: auto\n")
    path.chmod(0o444)
    with pytest.raises(PermissionError, match=r"read-only \(mode 0444\).*--output NEW.yaml"):
        check_writable(path)
    assert check_writable(path, output=tmp_path / "copy.yaml") == tmp_path / "copy.yaml"


def test_update_to_output_leaves_the_source_alone(tmp_path: Path) -> None:
    source = _recipe(tmp_path, "hera_heads: [L1H0]\n")  # explicit heads in the source do not block a copy
    source.chmod(0o640)
    before = source.read_bytes()
    output = tmp_path / "selected.yaml"
    assert update_recipe(source, HEADS, output=output) == output
    assert source.read_bytes() == before
    assert output.read_text() == RECIPE.format(entry=NEW + "\n")
    assert stat.S_IMODE(output.stat().st_mode) == 0o640

    output.write_text("stage: hera\nhera_heads: [L2H2]\n")
    with pytest.raises(FileExistsError) as err:
        update_recipe(source, ["L3H3"], output=output)
    assert str(output) in str(err.value) and "--force" in str(err.value)
    assert output.read_text() == "stage: hera\nhera_heads: [L2H2]\n"
    update_recipe(source, ["L3H3"], output=output, force=True)
    assert yaml.safe_load(output.read_text())["hera_heads"] == ["L3H3"]
    assert source.read_bytes() == before


def test_a_failed_write_leaves_the_recipe_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _recipe(tmp_path, "hera_heads: auto\n")
    path.chmod(0o664)
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("simulated replace failure")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        update_recipe(path, HEADS)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    update_recipe(path, HEADS)  # the written recipe keeps its permission bits
    assert stat.S_IMODE(path.stat().st_mode) == 0o664 and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


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
