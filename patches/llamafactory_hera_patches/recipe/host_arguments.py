"""The host's training keys, their allowed values and its chat template names, read (not patched) to check a recipe
before LLaMA-Factory parses it.

Checked on LLaMA-Factory 0.9.5: ``get_train_args`` parses a recipe into :data:`_CLASSES` (``HfArgumentParser`` refuses
other keys); a ``Literal`` or ``Enum`` field (``optim``, ...) is checked only in ``__post_init__``, by a bare
``assert`` or ``Enum`` lookup (a traceback, the value sometimes unnamed). ``ALLOW_EXTRA_ARGS`` ignores unknown keys;
under ``USE_MCA`` they are Megatron-Core's, not read here. An unknown template fails only after the tokenizer loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import importlib.util
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from ..guard import require

_CLASSES = ("ModelArguments", "DataArguments", "TrainingArguments", "FinetuningArguments", "GeneratingArguments")


@dataclass(frozen=True)
class HostKey:
    """One host recipe key. ``choices``: a ``Literal`` / ``Enum``'s values; ``number``: ``int`` or ``float``
    (``HfArgumentParser.parse_dict`` passes a YAML string on unconverted)."""

    name: str
    holder: str  # e.g. FinetuningArguments
    default: typing.Any
    choices: tuple[str, ...] = ()
    optional: bool = False
    number: type | None = None  # None allowed if optional
    help: str = ""
    flag: bool = False  # typed bool (or bool or None)


def _choices(hint: typing.Any) -> tuple[tuple[str, ...], bool]:
    """(string values a ``Literal`` / ``Enum`` accepts, whether None is). No values if another type is in the
    union."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    values: list[str] = []
    optional = other = False
    for member in members:
        if member is type(None):
            optional = True
        elif typing.get_origin(member) is typing.Literal and all(isinstance(v, str) for v in typing.get_args(member)):
            values += typing.get_args(member)
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            values += [str(item.value) for item in member]
        elif member is not str:  # str beside an enum (lr_scheduler_type): still looked up
            other = True
    return (() if other else tuple(values)), optional


def _single(hint: typing.Any) -> typing.Any:
    """The one type ``hint`` is (optionally with None); None for a union of several."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    found = [member for member in members if member is not type(None)]
    return found[0] if len(found) == 1 else None


@functools.cache
def host_keys() -> dict[str, HostKey]:
    """Every key a training recipe may give the host, by name."""
    # lazy: LLaMA-Factory's arguments, read once asked
    import llamafactory.hparams as hparams

    require(hparams, _CLASSES, "arguments")
    keys: dict[str, HostKey] = {}
    for holder in _CLASSES:
        cls = getattr(hparams, holder)
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError):
            hints = {}
        for spec in dataclasses.fields(cls):
            if spec.init and spec.name not in keys:
                choices, optional = _choices(hints.get(spec.name))
                default = spec.default if spec.default is not dataclasses.MISSING else None
                single = _single(hints.get(spec.name))
                keys[spec.name] = HostKey(
                    spec.name,
                    holder,
                    default,
                    choices,
                    optional,
                    single if single in (int, float) else None,
                    str(spec.metadata.get("help", "")),
                    single is bool,
                )
    return keys


def unknown_keys_pass() -> bool:
    """Whether unknown keys may be right: ignored (``ALLOW_EXTRA_ARGS=1``) or Megatron-Core's (``USE_MCA=1``)."""
    # lazy: LLaMA-Factory's arguments, read once asked
    import llamafactory.extras.misc as misc

    require(misc, ("is_env_enabled",), "arguments")
    return bool(misc.is_env_enabled("ALLOW_EXTRA_ARGS") or misc.is_env_enabled("USE_MCA"))


def template_names() -> tuple[str, ...]:
    """The registered chat templates (the plugin's LLaVA-1.5 ones included), sorted."""
    # lazy: LLaMA-Factory's arguments, read once asked
    import llamafactory.data.template as module

    require(module, ("TEMPLATES",), "templates")
    return tuple(sorted(module.TEMPLATES))


@functools.cache
def liger_applies_to(model_type: str) -> bool:
    """Whether ``enable_liger_kernel`` imports liger-kernel for ``model_type``: read from its source (which names each
    type), found without importing the host's model package."""
    spec = importlib.util.find_spec("llamafactory")
    folders = list(spec.submodule_search_locations or []) if spec else []
    source = Path(folders[0], "model", "model_utils", "liger_kernel.py") if folders else None
    return source is None or not source.is_file() or f'"{model_type}"' in source.read_text(encoding="utf-8")
