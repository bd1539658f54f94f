"""Hatchling build hook: the two files an editable install (``pip install -e .``) needs.

The wheel renames ``plugin/`` to ``llamafactory_hera`` and ``patches/`` to ``llamafactory_hera/patches``;
hatchling cannot express that renaming in an editable install, so ``dev-mode-dirs`` puts ``editable/``
on ``sys.path`` and this hook adds ``_llamafactory_hera_editable.pth``, which imports the finder kept
there (``editable/_llamafactory_hera_editable.py``), next to the start-up hook ``llamafactory_hera.pth``.
``.pth`` files run in name order: the path entry (``_llamafactory_hera.pth``, written by hatchling),
then the finder, then the start-up hook, which imports ``llamafactory_hera`` through the finder.
Standard wheels and sdists are built as without this hook.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class EditableInstallHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version != "editable":
            return
        # replaces the target's force-include for this build, so the start-up hook is named again
        build_data["force_include_editable"].update({
            "llamafactory_hera.pth": "llamafactory_hera.pth",
            "editable/_llamafactory_hera_editable.pth": "_llamafactory_hera_editable.pth",
        })
