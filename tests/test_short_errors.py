"""Which uncaught exceptions get the short report: the plugin's user errors (``RecipeError``), by their type."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llamafactory_hera import job_refusal
from llamafactory_hera.hera.config import parse_hera_arguments


def _caught(call) -> BaseException:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - the test inspects whatever was raised
        return error
    raise AssertionError("nothing raised")


def test_a_plugin_message_is_short_and_a_host_error_is_not() -> None:
    ours = _caught(lambda: parse_hera_arguments({"hera_k": 0, "hera_heads": ["L0H0"]}))
    assert isinstance(ours, job_refusal.RecipeError) and isinstance(ours, ValueError)
    assert job_refusal.raised_by_plugin(ours)
    assert job_refusal.short_report(ours).endswith(f"\n[llamafactory-hera] error: {ours}\n")  # the message last
    assert not job_refusal.raised_by_plugin(_caught(lambda: int("x")))  # a ValueError raised outside the plugin
    assert not job_refusal.raised_by_plugin(_caught(lambda: {}["missing"]))  # a bug: not a message


def test_an_internal_value_error_raised_by_the_plugin_keeps_its_traceback() -> None:
    """A ``ValueError`` the plugin raises on a ``raise`` line of its own for a programming error (a head map asked of
    a flat array) is not a user error: the type decides, not the source line."""
    from llamafactory_hera.plots.heads import plot_head_heatmap

    error = _caught(lambda: plot_head_heatmap([0.0, 0.0, 0.0], [], "unused.png", "scores"))
    assert type(error) is ValueError and not job_refusal.raised_by_plugin(error)


def test_an_error_of_a_torch_operation_called_by_the_plugin_keeps_its_traceback() -> None:
    """A C operation's RuntimeError (as a CUDA out-of-memory error in ``a @ b``) has its innermost Python frame in
    the plugin's code, on a line that is not a ``raise``: it is not one of the plugin's messages."""
    import torch

    from llamafactory_hera.hera.teacher import per_sample_features

    error = _caught(lambda: per_sample_features(torch.zeros(3, 4), torch.tensor([1, 1])))
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert isinstance(error, RuntimeError) and tb.tb_frame.f_globals["__name__"] == "llamafactory_hera.hera.teacher"
    assert not job_refusal.raised_by_plugin(error)


def test_excepthook_prints_only_the_message_for_plugin_errors() -> None:
    script = ("from llamafactory_hera import job_refusal; job_refusal.install(); "
              "from llamafactory_hera.hera.config import parse_hera_arguments; "
              "parse_hera_arguments({'hera_k': 0, 'hera_heads': ['L0H0']})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 2 and proc.stderr.splitlines()[-1].startswith("[llamafactory-hera] error: hera_k")
    other = subprocess.run([sys.executable, "-c", script.replace("parse_hera_arguments({", "int('x') or ({")],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and "Traceback" in other.stderr and "[llamafactory-hera]" not in other.stderr
    internal = subprocess.run([sys.executable, "-c", script.replace(
        "parse_hera_arguments({'hera_k': 0, 'hera_heads': ['L0H0']})",
        "__import__('llamafactory_hera.plots.heads').plots.heads.plot_head_heatmap([1, 2], [], 'unused.png', 't')")],
        capture_output=True, text=True, timeout=120)
    assert internal.returncode == 1 and "Traceback" in internal.stderr
    assert "must be a [layers, heads]" in internal.stderr
    assert "[llamafactory-hera]" not in internal.stderr


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_full_traceback_is_one_variable_away(value: str) -> None:
    script = ("from llamafactory_hera import job_refusal; job_refusal.install(); "
              "from llamafactory_hera.hera.config import parse_hera_arguments; "
              "parse_hera_arguments({'hera_k': 0, 'hera_heads': ['L0H0']})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLAMAFACTORY_HERA_TRACEBACK": value})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "hera_k" in proc.stderr


@pytest.mark.parametrize("raised,expected", [(job_refusal.RecipeError, job_refusal.RecipeError),
                                             (ZeroDivisionError, RuntimeError)])
def test_auto_selection_keeps_a_user_error_a_user_error_on_every_rank(monkeypatch: pytest.MonkeyPatch, raised: type,
                                                                      expected: type) -> None:
    """``hera_heads: auto`` re-raises rank 0's failure on every rank: a user error there (too few pairs) stays one."""
    from types import SimpleNamespace

    from llamafactory_hera.hera.selection import auto

    def fail(*args: object, **kwargs: object) -> None:
        raise raised("dataset d: only 3 usable image-caption pairs")

    monkeypatch.setattr(auto, "run_selection", fail)
    recipe = SimpleNamespace(data_args=SimpleNamespace(max_samples=None))
    error = _caught(lambda: auto.resolve_auto_heads(recipe, parse_hera_arguments({"hera_heads": "auto"}), 0, "cpu",
                                                    "out", True, dtype="float32"))
    shown = "" if raised is job_refusal.RecipeError else "ZeroDivisionError: "  # a user error needs no type name
    assert type(error) is expected and f"failed on rank 0: {shown}dataset d" in str(error)
    assert job_refusal.raised_by_plugin(error) == (expected is job_refusal.RecipeError)
