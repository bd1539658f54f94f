"""Start-up hook installed by ``llamafactory_hera.pth`` in every Python process.

It registers a meta-path finder that reacts only to a handful of LLaMA-Factory module names; when one of them
finishes executing, the matching patch in ``llamafactory_hera_patches`` runs (after :func:`register_methods` handed
the patches the declared methods). ``LLAMAFACTORY_HERA_DISABLE=1`` skips everything.

Start-up cost matters here: processes that never import LLaMA-Factory pay one dict lookup per imported module. This
module imports only what ``site`` has already loaded (``os``, ``sys``) and the registry (which imports nothing);
``importlib`` is imported only when a module is being patched, and the finder and loader follow the import protocols
by duck typing instead of subclassing ``importlib.abc`` (which would pull in ``typing`` and more).
"""

import os
import sys

DISABLE_ENV = "LLAMAFACTORY_HERA_DISABLE"

# host module -> patch module(s) (in llamafactory_hera_patches) whose ``apply(module)`` adapts it, in order
_TARGETS = {
    # for every stage: FSDP2 LoRA checkpoints saved and loaded whole (accelerate before PR 4206 kept rank 0's shard);
    # 4-bit weights kept out of FSDP2's mixed-precision upcast (their packed codes lost the bytes that form a NaN)
    "accelerate.utils.fsdp_utils": ("engines.fsdp_adapter", "engines.fsdp_qlora"),
    # accelerate launch of LLaMA-Factory's training: the recipe checked before the ranks, with the ranks' environment
    "accelerate.commands.launch": "accelerate_launch",
    "llamafactory.data.template": "data.llava_templates",  # LLaVA-1.5 templates of the families compose builds from
    "llamafactory.extras.constants": "webui.stage_list",
    # llamafactory-cli train under torchrun: the recipe checked before the ranks
    "llamafactory.launcher": "launch",
    "llamafactory.train.tuner": "stage",
    "llamafactory.webui.interface": "webui.board",  # LlamaBoard: the methods' panels, args, saved config, loss plot
}


class _PatchingLoader:
    """Delegates to the real loader, then applies the patch to the executed module."""

    def __init__(self, loader, patch: str) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = self._loader  # restore the real loader for introspection (inspect, resources)
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        _apply(self._patch, module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _PostImportFinder:
    """Finds target modules with the other finders and wraps their loader."""

    def find_spec(self, fullname: str, path, target=None):
        patch = _TARGETS.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def _apply(patch, module) -> None:
    import importlib

    refusal = importlib.import_module("llamafactory_hera_patches.stacks").unsupported_transformers()
    if refusal:  # a transformers outside what the plugin supports: one line, before anything is patched
        raise SystemExit(refusal)
    for name in (patch,) if isinstance(patch, str) else patch:
        importlib.import_module(f"llamafactory_hera_patches.{name}").apply(module)
    if patch in ("stage", "launch", "accelerate_launch"):  # a training process or its launcher: the plugin's
        # errors end it with their message alone
        importlib.import_module("llamafactory_hera.job_refusal").install()


def _declared_methods():
    from llamafactory_hera.methods import declared_methods

    return declared_methods()


def register_methods() -> None:
    """Register the plugin's declared methods with the patches (idempotent; the declarations are imported at the
    patches' first lookup)."""
    from llamafactory_hera_patches.registry import register_methods as register

    register(_declared_methods)


def install() -> None:
    """Register the finder once (idempotent); patch modules that were imported before this ran."""
    disabled = os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "y"}
    if disabled or any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return
    register_methods()
    sys.meta_path.insert(0, _PostImportFinder())
    for name, patch in _TARGETS.items():
        module = sys.modules.get(name)
        if module is not None:
            _apply(patch, module)
