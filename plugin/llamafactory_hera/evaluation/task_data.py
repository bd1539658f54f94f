"""Whether a library task's dataset can be read offline (docs/eval.md, "Refused before any model loads"). Imports
neither library's tasks nor ``datasets``."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline() -> str | None:
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={os.environ[name]}"
    return None


Dataset = tuple[str, str | None]  # (Hub path, configuration name)

# Datasets a lmms-eval 0.7.3 task's code loads besides its YAML's (into the default cache): GQA's images, read by
# gqa/utils.py ``gqa_process_docs``. No other preset task does (grep load_dataset in tasks/*/utils.py).
EXTRA_DATASETS: dict[str, tuple[Dataset, ...]] = {"gqa": (("lmms-lab-encoder/GQA", "testdev_balanced_images"),)}


def default_cache() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets"))).expanduser()


def datasets_cache(module: str) -> Path:
    """lmms-eval's api/task.py resolution without its makedirs (importing it would import every model and task)."""
    if module != "lmms_eval":
        return default_cache()

    def expanded(path: str) -> Path:
        return Path(os.path.expanduser(os.path.expandvars(path)))

    explicit = os.environ.get("LMMS_EVAL_DATASETS_CACHE", "").strip()
    if explicit:
        return expanded(explicit)
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")  # as lmms-eval does (no XDG_CACHE_HOME)
    target = expanded(
        os.environ.get("HF_DATASETS_CACHE", os.path.join(os.path.expanduser(os.path.expandvars(home)), "datasets"))
    )
    if importlib.util.find_spec("lmms_eval") is None:
        return target
    # lazy: the optional eval extra; this module imports only loguru
    from lmms_eval.caching.fs_detect import FsType, detect_fs_type, find_local_scratch
    from loguru import logger

    logger.disable("lmms_eval.caching.fs_detect")  # a DEBUG line per call
    try:
        scratch = find_local_scratch() if detect_fs_type(str(target)) is FsType.REMOTE else None
    finally:
        logger.enable("lmms_eval.caching.fs_detect")
    return Path(scratch, "lmms_eval_hf_datasets", os.environ.get("USER", "unknown")) if scratch else target


class _TaskLoader(yaml.SafeLoader):
    """``!function`` entries read as None (nothing imported)."""


_TaskLoader.add_constructor("!function", lambda loader, node: None)


def _read_task(path: Path) -> dict[str, Any]:
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader) or {}  # noqa: S506 - SafeLoader's subclass
    included = config.pop("include", None) or []
    merged: dict[str, Any] = {}
    for name in [included] if isinstance(included, str) else included:
        target = Path(name) if Path(name).is_absolute() else path.parent / name
        merged.update(_read_task(target))
    return {**merged, **config}


@functools.cache
def _task_files(module: str) -> dict[str, list[Path]]:
    spec = importlib.util.find_spec(module)
    found: dict[str, list[Path]] = {}
    for location in (spec.submodule_search_locations or []) if spec else []:
        for root, _, names in os.walk(Path(location) / "tasks"):
            for name in sorted(names):
                if name.endswith(".yaml"):
                    found.setdefault(name[:-5], []).append(Path(root) / name)
    return found


def task_dataset(task: str, module: str) -> tuple[str, str | None] | None:
    """From ``<task>.yaml``; None without that file (a group, a task named otherwise) or for a local dataset."""
    for path in _task_files(module).get(task, []):
        if not path.is_file():
            continue
        config = _read_task(path)
        if config.get("task") != task or not isinstance(config.get("dataset_path"), str):
            continue
        if Path(config["dataset_path"]).expanduser().exists() or "/" not in config["dataset_path"]:
            return None  # local, or the library's own
        return config["dataset_path"], config.get("dataset_name")
    return None


def _folded(name: str) -> str:
    return name.lower().replace("_", "")  # cache folders are snake case


def task_datasets(task: str, module: str) -> list[tuple[Dataset, Path, bool]]:
    """(dataset, cache folder, whether the load passes it as ``cache_dir``) per Hub dataset ``task`` loads."""
    found = task_dataset(task, module)
    own = [(found, datasets_cache(module), module == "lmms_eval")] if found else []
    return own + [(dataset, default_cache(), False) for dataset in EXTRA_DATASETS.get(task, ())]


def is_cached(dataset: Dataset, cache: Path) -> bool:
    """Whether ``cache`` holds ``<owner>___<name>/<config>/<version>/<hash>`` with the ``dataset_info.json``
    ``datasets`` 4.0 writes on completion."""
    owner, name = dataset[0].split("/", 1)
    if not cache.is_dir():
        return False
    roots = [
        root
        for root in cache.glob(f"{owner}___*")
        if root.is_dir() and _folded(root.name) == _folded(f"{owner}___{name}")
    ]
    config = dataset[1] or "*"
    return any(
        not path.name.endswith(".incomplete") and (path / "dataset_info.json").is_file()
        for root in roots
        for path in root.glob(f"{config}/*/*")
    )


def fetch_command(missing: list[tuple[Dataset, Path, bool]]) -> str:
    loads = "; ".join(
        f"datasets.load_dataset({path!r}{f', {name!r}' if name else ''}"
        f"{f', cache_dir={str(cache)!r}' if named else ''})"
        for (path, name), cache, named in dict.fromkeys(missing)
    )
    return f'HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -c "import datasets; {loads}"'
