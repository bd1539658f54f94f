"""What the demo shows while ``llamafactory-cli train`` runs: the plugin's lines and a line per logged step."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

from llamafactory_hera.runtime.log import PREFIX

_STEP_DICT = re.compile(r"\{'loss': [^{}]*\}")
# (Trainer log key, label): HeRA's and HARC's terms; a key the run does not log is left out
_SHOWN_METRICS = (
    ("loss", "loss"),
    ("lm_loss", "lm_loss"),
    ("hera_loss", "hera_loss"),
    ("hera_temperature", "tau"),
    ("harc_couple", "couple"),
    ("harc_couple_resp", "couple_resp"),
    ("harc_kl", "kl"),
    ("harc_ce", "ce"),
)


def step_line(step: int, total: int, metrics: dict[str, object]) -> str:
    """``[demo] step  3/20  loss 6.087  lm_loss 6.071  hera_loss 1.594  tau 0.07016``."""
    width = len(str(total))
    parts = [f"[demo] step {step:>{width}}/{total}"]
    parts += [f"{label} {metrics[key]}" for key, label in _SHOWN_METRICS if key in metrics]
    return "  ".join(parts)


class ProgressFilter:
    """Fed raw output; ``emit`` gets the lines worth showing. Split on ``\\n`` and ``\\r``: tqdm redraws with
    ``\\r``, and the Trainer's log dict lands on the bar's physical line."""

    def __init__(self, total_steps: int, emit: Callable[[str], None], logging_steps: int = 1) -> None:
        self.total_steps = total_steps
        self.emit = emit
        self.logging_steps = logging_steps  # the n-th log dictionary is step n * logging_steps
        self.steps_seen = 0
        self._pending = ""

    def feed(self, chunk: str) -> None:
        """Consume a chunk of output, split anywhere."""
        text = self._pending + chunk
        *complete, self._pending = re.split(r"[\r\n]", text)
        for line in complete:
            self._line(line)

    def close(self) -> None:
        if self._pending:
            self._line(self._pending)
            self._pending = ""

    def _line(self, line: str) -> None:
        if PREFIX in line:
            self.emit(line[line.index(PREFIX) :].rstrip())
            return
        for match in _STEP_DICT.finditer(line):
            try:
                metrics = ast.literal_eval(match.group(0))
            except (ValueError, SyntaxError):
                continue
            self.steps_seen += 1
            self.emit(step_line(min(self.steps_seen * self.logging_steps, self.total_steps), self.total_steps, metrics))
