"""docs/cost.md's ``llamafactory-hera plan`` examples are plan's own output, and the 72B figures the 72B recipe's
header and docs/hera.md quote are those of its example.

Cheap by default: the quoted figures against docs/cost.md's 72B block (no count). The blocks themselves are checked
only with ``PLAN_DOCS=1`` (minutes: each example is counted at full size on the CPU), which runs every example's
command again, with the models' published config.json from tests/plan_configs.py in a local Hub cache, and compares
its output with the block line by line (the ``(counted in N s`` line aside); ``PLAN_DOCS=write`` rewrites the blocks
with it. Run it after any change to plan's counting or report."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO
from llamafactory_hera.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from plan_configs import hub_cache  # noqa: E402

COST = REPO / "docs" / "cost.md"
EXAMPLE = re.compile(r"^    \$ llamafactory-hera plan ((?:.*\\\n)*.*)\n((?:    .*\n)*?)\n", re.M)
COUNTED = re.compile(r"^    \(counted in \d+ s on this CPU\)$", re.M)
HOST_LOG = re.compile(r"^\[(WARNING|INFO)\|\d{4}-\d\d-\d\d [\d:]+\] llamafactory\.")


def examples(text: str) -> list[re.Match]:
    return list(EXAMPLE.finditer(text))


def _72b(text: str) -> dict[str, str]:
    block = next(found[2] for found in examples(text) if "qwen2_5_72b" in found[1])
    return {"needed": re.search(r"fits: ([\d.]+) GiB needed", block)[1],
            "peak": re.search(r"step peak +[\d.]+ +([\d.]+)", block)[1],
            "tflops": re.search(r"HERA: ([\d.]+) TFLOPs", block)[1]}


def test_the_72b_figures_quoted_are_the_examples() -> None:
    """The 72B recipe's header and docs/hera.md quote the GiB needed and HeRA's step peak of docs/cost.md's 72B
    example."""
    figures = _72b(COST.read_text())
    header = (REPO / "recipes" / "qwen2_5_72b_hera_fsdp2.yaml").read_text()
    hera = (REPO / "docs" / "hera.md").read_text()
    for text in (header, hera):
        assert f"{figures['needed']} GiB needed" in text and f"step peak {figures['peak']} GiB" in text


@pytest.mark.skipif(not os.environ.get("PLAN_DOCS"), reason="PLAN_DOCS=1: minutes (each example counted at full size)")
def test_the_docs_examples_are_plans_output(tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub")))
    monkeypatch.chdir(REPO)
    text = COST.read_text()
    for found in reversed(examples(text)):  # from the end: each rewrite keeps the earlier offsets
        assert main(["plan", *shlex.split(found[1].replace("\\\n", " "))]) == 0, found[1]
        out = "".join(f"    {line}\n" for line in capsys.readouterr().out.strip().splitlines()
                      if not HOST_LOG.match(line))  # the suite's DISABLE_VERSION_CHECK warning: not plan's
        if os.environ["PLAN_DOCS"] == "write":
            text = text[:found.start(2)] + out + text[found.end(2):]
        else:
            assert COUNTED.sub("", out) == COUNTED.sub("", found[2]), found[1]
    if os.environ["PLAN_DOCS"] == "write":
        COST.write_text(text)
