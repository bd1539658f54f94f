"""LlamaBoard without a browser: the stock UI built in a process of its own (forked from the warm process,
tests/warm_launch.py, which never imported LLaMA-Factory's web UI or gradio) and driven through its buttons' callbacks.

The LlamaBoard tests write a probe script that builds the UI with :class:`Board`, reports what the callbacks return and
prints the report with :func:`print_report`; :func:`run_probe` runs such a script (with this folder on ``sys.path``,
as :mod:`plot_checks` is) and returns its report. Imports of LLaMA-Factory happen inside :class:`Board` alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TESTS = Path(__file__).parent
REPORT = "REPORT="


def run_probe(probe: str, args: list[str], cwd: Path, env: dict[str, str], timeout: int) -> dict[str, Any]:
    """Run ``probe`` with ``args`` in a process of its own in ``cwd`` (where LlamaBoard keeps its cache and saves;
    tests/dist_runs.py ``run_python``) and return its report; the probe's output is shown if it fails or reports
    nothing."""
    from dist_runs import run_python  # lazy: dist_runs imports torch, which a probe's test need not

    (cwd / "webui_probe_script.py").write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n{probe}",
                                               encoding="utf-8")
    proc = run_python(cwd / "webui_probe_script.py", args, cwd=cwd, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(REPORT)]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len(REPORT):])


def print_report(report: dict[str, Any]) -> None:
    """Print a probe's report for :func:`run_probe` (values JSON cannot hold as their ``str``)."""
    print(REPORT + json.dumps(report, default=str))


class Board:
    """The stock ``create_ui()``, its runner (the Train tab's buttons call it) and its elements by id.

    ``defaults``: the element values (by id, e.g. ``"top.model_path"``) every :meth:`data_for` starts from, over the
    UI's own values.
    """

    def __init__(self, defaults: dict[str, Any]) -> None:
        from llamafactory.extras.constants import TRAINING_STAGES
        from llamafactory.webui.interface import create_ui

        self.demo = create_ui()
        self.preview = self.callback("preview_train")
        self.runner = self.preview.fn.__self__
        self.manager = self.runner.manager
        self.defaults = defaults
        self.stages = list(TRAINING_STAGES)

    def callback(self, name: str) -> Any:
        """The UI's event bound to the function called ``name``."""
        return next(f for f in self.demo.fns.values() if getattr(f.fn, "__name__", "") == name)

    def elem(self, elem_id: str) -> Any:
        return self.manager.get_elem_by_id(elem_id)

    def report(self) -> dict[str, Any]:
        """The stages listed, the ids of the elements the buttons send, and the ids of the Train tab's elements."""
        return {"stages": self.stages, "preview_inputs": sorted(self.manager.get_id_by_elem(c)
                                                                for c in self.preview.inputs),
                "train_ids": [i for i in self.manager._id_to_elem if i.startswith("train.")]}

    def data_for(self, label: str, **overrides: Any) -> dict[Any, Any]:
        """What the buttons send with the stage ``label`` picked: the defaults, then ``overrides`` (by element id)."""
        data = {c: c.value for c in self.preview.inputs}
        for elem_id, value in {**self.defaults, "train.training_stage": label, **overrides}.items():
            data[self.elem(elem_id)] = value
        return data

    def error(self, data: dict[Any, Any]) -> str:
        """The alert Preview and Start show for ``data`` ('' when none)."""
        return self.runner._initialize(data, True, True)

    def preview_text(self, data: dict[Any, Any]) -> str:
        """What Preview writes in the output box for ``data``."""
        return next(self.runner.preview_train(data))[self.elem("train.output_box")]

    def change_lang(self, lang: str) -> dict[Any, Any]:
        """The updates the language dropdown sends, by element, for ``lang``."""
        return self.callback("change_lang").fn(lang)

    def panel(self, method: str, langs: tuple[str, ...]) -> dict[str, Any]:
        """A method's panel (``train.<method>_tab``): whether it shows with each stage picked and at first, and the
        label and info of the panel and its fields (``train.<method>_*``) in each of ``langs``."""
        tab, stage = self.elem(f"train.{method}_tab"), self.elem("train.training_stage")
        toggle = next(f for f in self.demo.fns.values() if tab in f.outputs and stage in f.inputs)
        prefix = f"train.{method}_"
        labels = {lang: {self.manager.get_id_by_elem(e): {"label": u.label, "info": getattr(u, "info", None)}
                         for e, u in self.change_lang(lang).items()
                         if self.manager.get_id_by_elem(e).startswith(prefix)} for lang in langs}
        return {"visible": {label: toggle.fn(label).visible for label in self.stages},
                "initially_visible": tab.visible, "labels": labels}
