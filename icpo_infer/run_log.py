"""``log.txt`` in a run's output directory: what the run printed (stdout, stderr with its warnings, and
logging), with timestamps, appended when the run resumes."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_FILE = "log.txt"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Tee:
    """A text stream that writes through to ``stream`` and logs each complete line to ``logger``."""

    def __init__(self, stream: TextIO, logger: logging.Logger) -> None:
        self.stream = stream
        self.logger = logger
        self.pending = ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._log(line)
        return len(text)

    def _log(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1]  # a progress bar redraws its line with \r: its last state
        if line.strip():
            self.logger.info(line)

    def close_line(self) -> None:
        self._log(self.pending)
        self.pending = ""

    def __getattr__(self, name: str):  # flush, fileno, isatty, encoding ... of the wrapped stream
        return getattr(self.stream, name)


def _non_propagating_loggers() -> list[logging.Logger]:
    """Loggers that print through their own handlers without passing records to the root logger
    (transformers', vLLM's)."""
    return [
        logger
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and not logger.propagate and logger.handlers
    ]


@contextlib.contextmanager
def run_log(directory: str | Path) -> Iterator[None]:
    """Append everything printed or logged in this block to ``directory/log.txt`` (created with the
    permissions a plain ``open()`` gives, like the run's other outputs). Enter it only once the
    directory holds the run: after its inputs were checked and its model loaded."""
    handler = logging.FileHandler(Path(directory) / LOG_FILE, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    loggers = [root, *_non_propagating_loggers()]
    for logger in loggers:
        logger.addHandler(handler)
    # With no handler of its own, the root logger printed warnings through logging.lastResort, which
    # the file handler now replaces: keep them on the console.
    console = None
    if root.handlers == [handler]:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        root.addHandler(console)
    streams = {}
    for name in ("stdout", "stderr"):
        lines = logging.Logger(name)  # outside the logging tree: reaches this file only
        lines.addHandler(handler)
        streams[name] = (getattr(sys, name), _Tee(getattr(sys, name), lines))
        setattr(sys, name, streams[name][1])
    try:
        yield
    finally:
        for name, (stream, tee) in streams.items():
            tee.close_line()
            if getattr(sys, name) is tee:
                setattr(sys, name, stream)
        for logger in loggers:
            logger.removeHandler(handler)
        if console is not None:
            root.removeHandler(console)
        handler.close()
