"""Logging for the ``frcnn`` package: ``log.txt`` in the output folder, console on rank 0.

Modules log with ``logging.getLogger(__name__)``; their records reach the handlers installed here
on the ``frcnn`` logger. Console lines go through ``tqdm.write`` so they do not tear the progress
bar.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

PACKAGE_LOGGER = "frcnn"
_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"
_DATE_FORMAT = "%m/%d %H:%M:%S"


class _TqdmConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(output_dir: str | Path | None, rank: int = 0) -> logging.Logger:
    """Configure the ``frcnn`` logger; calling it again replaces the handlers it installed.

    Rank 0 writes ``<output_dir>/log.txt`` and the console; other ranks write only
    ``<output_dir>/log_rank<r>.txt`` (what a crashed rank said is then still on disk).
    """
    package_logger = logging.getLogger(PACKAGE_LOGGER)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    for handler in list(package_logger.handlers):
        if getattr(handler, "_frcnn_handler", False):
            package_logger.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter(_FORMAT, datefmt=_DATE_FORMAT)
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(_TqdmConsoleHandler())
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        name = "log.txt" if rank == 0 else f"log_rank{rank}.txt"
        handlers.append(logging.FileHandler(Path(output_dir) / name, mode="a"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._frcnn_handler = True  # type: ignore[attr-defined]
        package_logger.addHandler(handler)
    return package_logger
