"""The recipe file of ``llamafactory-cli train recipe.yaml``, read as the host reads it, with its mistakes named.

Checked on LLaMA-Factory 0.9.5: ``read_args(args=None)`` (bound in ``train.tuner``, looked up by ``run_exp`` at call
time) returns ``args`` if given; else ``OmegaConf.load(sys.argv[1])`` (``.yaml`` / ``.yml``) merged with
``OmegaConf.from_cli(sys.argv[2:])``. A missing path, YAML syntax error or empty file (a host traceback) is one
:class:`RecipeError` naming the file, line and column, for every stage (unknown before the read).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from omegaconf import OmegaConf

from llamafactory_hera.runtime.errors import RecipeError

from ..guard import require

_SUFFIXES = (".yaml", ".yml", ".json")  # read_args reads these as files (.json: json.load)
ReadArgs = Callable[..., Any]


def _recipe_path(argv: list[str]) -> str | None:
    """The recipe file ``read_args`` would read (None: ``--key value`` arguments)."""
    return argv[1] if len(argv) > 1 and argv[1].endswith(_SUFFIXES) else None


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "an unknown place"


def _syntax_error(path: str, error: yaml.YAMLError) -> RecipeError:
    mark = getattr(error, "problem_mark", None)
    in_file = mark is not None and Path(str(mark.name)).resolve() == Path(path).resolve()
    source = f"{path}" if in_file or mark is None else f"a key=value override after {path}"
    problem = str(getattr(error, "problem", None) or error).strip()
    context_mark = getattr(error, "context_mark", None)
    context = getattr(error, "context", None)
    started = f" ({context} at {_where(context_mark)})" if context and in_file else ""
    return RecipeError(
        f"recipe: {source} is not valid YAML: {problem} at {_where(mark) if in_file else 'its value'}"
        f"{started}. Correct the YAML there."
    )


def _holds_nothing(path: Path) -> bool:
    """Whether the recipe is empty or only comments (the host's parse would fail in a traceback)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8", errors="replace")) is None
    except yaml.YAMLError:
        return False  # read_args names the mistake (see _syntax_error)


def read_args_unchecked(args: Any = None, argv: list[str] | None = None) -> Any:
    """``hparams.read_args``'s result for ``argv`` (v1 reads alike), without importing ``llamafactory.hparams``,
    whose import runs v0's version checks (v1 does not)."""
    argv = sys.argv if argv is None else argv
    path = _recipe_path(argv) if args is None else None
    if path is None:
        return argv[1:] if args is None else args
    loaded = OmegaConf.load(Path(path).absolute())  # JSON too, a YAML subset
    return OmegaConf.to_container(OmegaConf.merge(loaded, OmegaConf.from_cli(argv[2:])))


def read_recipe(read_args: ReadArgs, args: Any = None, argv: list[str] | None = None) -> Any:
    """``read_args(args)``, refusing by name a recipe file that is missing, empty or not YAML."""
    path = _recipe_path(sys.argv if argv is None else argv) if args is None else None
    if path is not None and not Path(path).is_file():
        where = "" if Path(path).is_absolute() else f" (relative to the folder the run starts in, {Path.cwd()})"
        what = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
        raise RecipeError(
            f"recipe: {path} {what}{where}. Name a recipe file: llamafactory-cli train path/to/recipe.yaml."
        )
    if path is not None and _holds_nothing(Path(path)):
        raise RecipeError(
            f"recipe: {path} is empty: it sets no keys. Write the run's keys into it "
            "(model_name_or_path, stage, dataset, output_dir, ...; recipes/ holds examples) or name "
            "another recipe file."
        )
    try:
        return read_args(args)
    except yaml.YAMLError as error:
        if path is None:
            raise
        raise _syntax_error(path, error) from None


def launch_recipe(argv: list[str]) -> Any:
    """The recipe of ``llamafactory-cli <command> <recipe> [key=value ...]`` as v0 and v1 read it, without v0's
    import-time version checks (a trl outside v0's range trains under v1)."""
    command = [argv[0], *argv[2:]]
    return read_recipe(functools.partial(read_args_unchecked, argv=command), argv=command)


def apply(tuner: ModuleType) -> None:
    """Route ``tuner.read_args`` (``run_exp``'s first read) through :func:`read_recipe`, once."""
    require(tuner, ("read_args",), "recipe file")
    if getattr(tuner.read_args, "__module__", None) == __name__:  # patched already
        return
    original = tuner.read_args

    def read_args(args: Any = None) -> Any:
        return read_recipe(original, args)

    tuner.read_args = read_args
