"""The host's "Media ... does not exist in `media_dir`" warnings, held while a method checks its image files.

Checked on LLaMA-Factory 0.9.5: ``DatasetConverter._find_medias`` logs one per file while aligning rows, before a
method's check runs. :func:`media_warnings_held` holds them: dropped if the block ends in the plugin's refusal, else
logged once each. Worker processes inherit the filter; each holds at most :data:`MAX_HELD`, then says in
one line that more were left out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from typing_extensions import override

from llamafactory_hera.runtime.errors import RecipeError

CONVERTER_LOGGER = "llamafactory.data.converter"
MAX_HELD = 1000
_FIELDS = (
    "name",
    "levelno",
    "levelname",
    "pathname",
    "filename",
    "module",
    "lineno",
    "funcName",
    "created",
    "msecs",
    "relativeCreated",
    "process",
    "processName",
    "thread",
    "threadName",
)


def is_media_warning(message: str) -> bool:
    return message.startswith("Media ") and "does not exist in `media_dir`" in message


class _Hold(logging.Filter):
    """Keeps media warnings from the handlers, one JSON line each in ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.seen: set[str] = set()  # a forked worker starts from its parent's

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not is_media_warning(message):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        if len(self.seen) > MAX_HELD + 1:
            return False
        line = (
            {"capped": True}
            if len(self.seen) > MAX_HELD
            else {**{key: getattr(record, key, None) for key in _FIELDS}, "msg": message}
        )
        with open(self.path, "a", encoding="utf-8") as held:  # workers append too
            held.write(json.dumps(line) + "\n")
        return False


@contextlib.contextmanager
def media_warnings_held() -> Iterator[Path]:
    """Hold media warnings for the block; yields the file holding them."""
    logger = logging.getLogger(CONVERTER_LOGGER)
    with tempfile.TemporaryDirectory(prefix="llamafactory_hera_media_") as folder:
        hold = _Hold(os.path.join(folder, "held.jsonl"))
        Path(hold.path).touch()
        logger.addFilter(hold)
        try:
            yield Path(hold.path)
        except RecipeError:
            raise  # the refusal names the first missing file: the lines would bury it
        except BaseException:
            logger.removeFilter(hold)
            _replay(logger, hold.path)  # another failure: the lines above it
            raise
        finally:
            logger.removeFilter(hold)
        _replay(logger, hold.path)


def _replay(logger: logging.Logger, path: str) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as held:
        lines = [json.loads(line) for line in held]
    records = {fields["msg"]: fields for fields in lines if fields.get("msg")}
    for fields in records.values():
        logger.handle(logging.makeLogRecord({**fields, "args": None}))
    if any(fields.get("capped") for fields in lines):
        logger.warning(
            f"More files than these {len(records)} do not exist in `media_dir` (each process shows its "
            f"first {MAX_HELD}); LLaMA-Factory used their original paths."
        )
