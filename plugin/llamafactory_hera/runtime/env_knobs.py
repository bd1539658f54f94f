"""The plugin's environment variables, parsed as strictly as a recipe key: a switch takes one of :data:`ON` or
:data:`OFF`, a bound a number of seconds above 0. :func:`check` refuses a wrong one before the host parses the recipe.
The start-up hook reads ``LLAMAFACTORY_HERA_DISABLE`` itself: a value neither on nor off keeps the plugin on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from .errors import RecipeError

ON = ("1", "true", "yes", "y", "on")
OFF = ("0", "false", "no", "n", "off")
DISABLE = "LLAMAFACTORY_HERA_DISABLE"
TRACEBACK = "LLAMAFACTORY_HERA_TRACEBACK"
START_TIMEOUT = "LLAMAFACTORY_HERA_START_TIMEOUT"
START_S = 600.0
# each variable -> what its switch does, or its bound's default seconds and what it bounds
SWITCHES = {
    DISABLE: "runs LLaMA-Factory without the plugin",
    TRACEBACK: "prints the full traceback of the plugin's errors",
}
BOUNDS = {START_TIMEOUT: (START_S, "the time a launch's nodes have to join and its ranks to start")}


def switch(name: str, env: Mapping[str, str] | None = None) -> bool:
    # os.environ read at the call: datasets' map(num_proc=N) rebinds it to a copy, which a default keeps
    env = os.environ if env is None else env
    value = env.get(name, "")
    spelled = value.strip().lower()
    if spelled in ON or spelled in OFF or not spelled:
        return spelled in ON
    raise RecipeError(
        f"{name}={value} is neither on nor off: set it to 1 (or {', '.join(ON[1:])}) if the plugin {SWITCHES[name]}, "
        f"or to 0 ({', '.join(OFF[1:])}) or unset it if not."
    )


def seconds(name: str, env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    value = env.get(name, "")
    default, bounds = BOUNDS[name]
    if not value.strip():
        return default
    try:
        parsed = float(value)
    except ValueError:
        parsed = None
    if parsed is not None and math.isfinite(parsed) and parsed > 0:
        return parsed
    said = "is not a number of seconds" if parsed is None or not math.isfinite(parsed) else "must be above 0 seconds"
    raise RecipeError(
        f"{name}={value} {said} ({bounds}): set it to seconds without a unit, e.g. {int(default)} for "
        f"{int(default) // 60} minutes, or unset it for {int(default)} s."
    )


def check(env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    for name in SWITCHES:
        switch(name, env)
    for name in BOUNDS:
        seconds(name, env)
