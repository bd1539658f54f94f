"""LLaMA-Factory's Ray driver (``USE_RAY=1``: ``run_exp`` calls ``_ray_training_function``, whose workers each run
``_training_function``, the stage patch's): a run that Ray ends is recorded as ended.

Checked on LLaMA-Factory 0.9.5 and main: when a worker fails or the driver is interrupted, the driver's ``ray.get``
raises and, as the driver exits, Ray kills the workers still running, the rank that writes the run record among them,
before its stage can record the end: the record said ``running`` for good. The driver records it instead, where this
run's record still says ``running``: ``failed`` with the worker's error (or the interrupt), ``finished`` where the
model was saved (:func:`llamafactory_hera.runtime.run_record.write_ended`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime import run_record
from llamafactory_hera.runtime.raw_recipe import raw_value
from llamafactory_hera.runtime.registry import method_for_stage


def ray_training_function(host: Callable[..., None], ray_args: Any, config: dict[str, Any]) -> None:
    """The host's ``_ray_training_function(ray_args, config)``; when it raises, the run's record ended."""
    started_ns = time.time_ns()
    try:
        host(ray_args, config)
    except BaseException as error:
        record_ended_by_ray(config.get("args") or {}, started_ns, error)
        raise


def record_ended_by_ray(host_args: Any, started_ns: int, error: BaseException) -> None:
    """Mark the record in the recipe's output_dir ended by ``error`` if it is this run's (written since
    ``started_ns``) and still ``running``; a record its rank ended, or an older run's, stays as it is."""
    output_dir = raw_value(host_args, "output_dir")
    if not output_dir:
        return
    # Ray wraps a worker's exception (RayTaskError): its cause is the stage's own error, whose first line is recorded
    cause = getattr(error, "cause", None)
    ended_by = cause if isinstance(cause, BaseException) else error
    method = method_for_stage(raw_value(host_args, "stage"))
    records = method.records if method is not None else ()
    run_record.end_unended(Path(str(output_dir)) / run_record.RUN_RECORD, started_ns, ended_by, records)
