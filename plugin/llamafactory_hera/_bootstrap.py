"""Start-up hook, run by ``llamafactory_hera.pth`` in every Python process (``LLAMAFACTORY_HERA_DISABLE=1``: off).

A meta-path finder watches a few modules; when one has executed, its patch in ``llamafactory_hera_patches`` runs, after
the transformers check and :func:`register_methods`. Only LLaMA-Factory's processes are touched.

Cheap start-up: a process that never imports LLaMA-Factory pays one dict lookup per import. Only ``os`` and ``sys``
(loaded by ``site``) at import, ``importlib`` when patching; the finder and loader duck-type the import protocols
(``importlib.abc`` pulls in ``typing`` and more).
"""

import os
import sys

DISABLE_ENV = "LLAMAFACTORY_HERA_DISABLE"
# its on values, runtime/env_knobs.py's ON (not imported: see above); a value neither on nor off is refused there
DISABLE_ON = ("1", "true", "yes", "y", "on")

# host module -> patch module(s) whose ``apply(module)`` adapts it, in order
# every stage: FSDP2 LoRA checkpoints saved and loaded whole (accelerate before PR 4206 kept rank 0's shard); 4-bit
# weights kept out of FSDP2's mixed-precision upcast (it lost the packed codes' bytes that form a NaN)
_ACCELERATE = {"accelerate.utils.fsdp_utils": ("engines.fsdp_adapter", "engines.fsdp_qlora")}
# a launcher's elastic agent (torchrun, accelerate launch, ft_launcher) of LLaMA-Factory's training: a refusal in its
# ranks is the node's last line, a run record they left running is ended
_AGENTS = {
    "torch.distributed.launcher.api": "elastic_agent",
    "nvidia_resiliency_ext.fault_tolerance.launcher": "elastic_agent",
}
_TARGETS = {
    **_ACCELERATE,
    **_AGENTS,
    # accelerate launch of LLaMA-Factory's training: the recipe checked before the ranks, in their environment
    "accelerate.commands.launch": "accelerate_launch",
    "llamafactory.data.template": "data.llava_templates",  # LLaVA-1.5 templates of compose's families
    "llamafactory.extras.constants": "webui.stage_list",
    # llamafactory-cli train under torchrun: the recipe checked before the ranks
    "llamafactory.launcher": "launch",
    "llamafactory.train.tuner": "stage",
    # LLaMA-Factory's v1 (USE_V1=1, a v1 trainer): a plugin stage refused before v1 reads the recipe
    "llamafactory.v1.config": "v1",
    "llamafactory.v1.launcher": "v1",
    "llamafactory.webui.interface": "webui.board",  # LlamaBoard: the methods' panels, args, saved config, loss plot
}
_RUNS_TRAINING = ("from llamafactory.train.tuner import run_exp", "run_exp()")  # launcher.py, a clone's src/train.py
_patched: set[str] = set()  # the modules patched in this process


def runs_llamafactory(argv: list[str]) -> bool:
    """Whether a launcher's command line (``accelerate launch``, ``torchrun``, ``ft_launcher``) runs LLaMA-Factory's
    training: its launcher, its CLI, or a script
    (the first ``.py`` named) that calls ``run_exp()``; not a user's own script, whatever lies beside it."""
    for token in argv[1:]:
        name = token.replace("\\", "/").rsplit("/", 1)[-1]
        if token == "llamafactory.launcher" or name in ("llamafactory-cli", "lmf"):
            return True
        if name.endswith(".py") and os.path.isfile(token):
            with open(token, encoding="utf-8", errors="replace") as script:
                text = script.read()
            return all(part in text for part in _RUNS_TRAINING)
    return False


def _patch_for(name: str):
    if name in _ACCELERATE and "llamafactory" not in sys.modules:
        return None  # patched once the process imports LLaMA-Factory (_apply)
    if (name == "accelerate.commands.launch" or name in _AGENTS) and not runs_llamafactory(sys.argv):
        return None
    return _TARGETS.get(name)


class _PatchingLoader:
    """The real loader, then the patch on the executed module."""

    def __init__(self, loader, patch: str) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = self._loader  # the real loader back, for introspection (inspect, resources)
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        _apply(self._patch, module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _PostImportFinder:
    """Finds targets with the other finders and wraps their loader."""

    def find_spec(self, fullname: str, path, target=None):
        patch = _patch_for(fullname)
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
    # lazy: the module doc
    import importlib

    from llamafactory_hera_patches.stacks import unsupported_transformers  # lazy: the module doc

    refusal = unsupported_transformers()
    if refusal:  # an unsupported transformers: one line, before anything is patched
        raise SystemExit(refusal)
    importlib.import_module(__name__).register_methods()  # the copy in sys.modules: one source registered
    for name in (patch,) if isinstance(patch, str) else patch:
        importlib.import_module(f"llamafactory_hera_patches.{name}").apply(module)
    name = getattr(module, "__name__", "")
    _patched.add(name)
    if name.startswith("llamafactory"):  # accelerate's modules imported before LLaMA-Factory: patched now
        for pending in _ACCELERATE.keys() - _patched:
            if pending in sys.modules:
                _apply(_ACCELERATE[pending], sys.modules[pending])
    if patch in ("stage", "launch", "accelerate_launch", "v1"):  # training or its launcher: job_refusal's module doc
        from llamafactory_hera import job_refusal  # lazy: the module doc

        job_refusal.install()


def _declared_methods():
    from llamafactory_hera.methods import declared_methods  # lazy: the module doc

    return declared_methods()


def register_methods() -> None:
    """Register the declared methods with the patches (idempotent; imported at the patches' first lookup)."""
    from llamafactory_hera.runtime.registry import register_methods as register  # lazy: the module doc

    register(_declared_methods)


def install() -> None:
    """Register the finder (once) and patch the targets already imported; then this module and its package, if it
    holds nothing else yet, leave ``sys.modules``."""
    disabled = os.environ.get(DISABLE_ENV, "").strip().lower() in DISABLE_ON
    if not disabled and not any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
        for name in _TARGETS:
            if name in sys.modules and (patch := _patch_for(name)) is not None:
                _apply(patch, sys.modules[name])
    if not any(name.startswith(f"{__package__}.") and name != __name__ for name in sys.modules):
        sys.modules.pop(__name__, None)
        sys.modules.pop(__package__, None)
