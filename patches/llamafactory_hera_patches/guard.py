"""Shape checks of the host before patching."""

from __future__ import annotations

import warnings
from types import ModuleType

from . import CHECKED_VERSIONS

DISABLE_ENV = "LLAMAFACTORY_HERA_DISABLE"


class HostMismatchError(RuntimeError):
    """LLaMA-Factory's internals do not have the shape a patch was written for."""


def host_version(distribution: str = "llamafactory") -> str:
    """The installed version of ``distribution`` (LLaMA-Factory's by default), ``unknown`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version  # lazy: the patches load at every start-up

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def recorded_versions() -> dict[str, str]:
    """The versions a run's record names (select's and RAH-LoRA's), ``unknown`` for one not installed."""
    return {name: host_version(name) for name in ("llamafactory-hera", "llamafactory", "transformers", "torch", "peft")}


def mismatch(patch: str, found: str) -> HostMismatchError:
    """The error for a host whose internals the ``patch`` was not written for (``found``: what differs)."""
    return HostMismatchError(
        f"llamafactory-hera: LLaMA-Factory {host_version()} does not have the internals the '{patch}' patch "
        f"was written for ({found}). The plugin was checked on "
        f"LLaMA-Factory {', '.join(CHECKED_VERSIONS)}; install one of those, upgrade llamafactory-hera, or set "
        f"{DISABLE_ENV}=1 to run LLaMA-Factory without the plugin."
    )


def require(module: ModuleType, names: tuple[str, ...], patch: str) -> None:
    """Raise :class:`HostMismatchError` unless ``module`` has every attribute in ``names``."""
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise mismatch(patch, f"{module.__name__} lacks {', '.join(missing)}")


_warned = False


def warn_if_unchecked() -> None:
    """One warning when the host version is not among the checked ones (shapes already verified)."""
    global _warned
    if not _warned and host_version() not in CHECKED_VERSIONS:
        _warned = True
        warnings.warn(
            f"llamafactory-hera was checked on LLaMA-Factory {', '.join(CHECKED_VERSIONS)}, found {host_version()}; "
            "its internals have the expected shape, continuing.",
            stacklevel=2,
        )
