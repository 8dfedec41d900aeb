"""What a long command prints: this tool's own lines and the run's progress on the console, everything
else (Ray's, vLLM's and the models' logs, relayed from the workers) in a log file under the output.

While a `RunConsole` is open it stands in for `sys.stdout` and `sys.stderr`. Ray's driver relays each
worker's lines with a `(task or actor pid=N)` prefix (`(raylet)` for Ray's own), one `print` each, looking
the stream up at each call; so does every library's `print`, warning and (newly made) log handler. A
write that starts with a relay prefix goes to the log file only; any other write (this tool's output, a
traceback, a progress bar drawn on a terminal) goes to the console and the log file.

Without a terminal, Ray Data's logging progress (a block of lines per operator every
`RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL` seconds, relayed from the wave process) is condensed to one line
per stage of the method whose rows moved since the last report.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from synthalign_ray import store
from synthalign_ray.ray_private import RELAY_PREFIX
from synthalign_ray.progress import stage_labels
from synthalign_ray.runtime import drive_wave

LOGS_FOLDER = "logs"

# The task that drives a wave's Ray Data execution, whose lines hold the progress.
WAVE_TASK = drive_wave.__name__
# A line of Ray Data's logging progress naming an operator and its rows: `MapBatches(ImageScorer): 3/6`.
OPERATOR_PROGRESS = re.compile(r"^(?P<operator>\S.*?): (?P<done>\d+)/(?P<total>\S+)\s*$")
REPORT_START = "======= Running Dataset"
REPORT_END = "======="


class ProgressLines:
    """Turns Ray Data's logging progress reports into one line per stage whose rows moved."""

    def __init__(self, stages: list[tuple[str, tuple[str, ...]]], emit: Callable[[str], None], clock=time.monotonic):
        self.stages, self.emit, self.clock = stages, emit, clock
        self.started = clock()
        self.report: list[tuple[str, int, str]] | None = None
        self.last: dict[str, str] = {}

    def line(self, text: str) -> None:
        if text.startswith(REPORT_START):
            self.report = []
        elif self.report is not None and text.startswith(REPORT_END):
            self._flush(self.report)
            self.report = None
        elif self.report is not None and (match := OPERATOR_PROGRESS.match(text)) and match["operator"] != "Total Progress":
            self.report.append((match["operator"], int(match["done"]), match["total"]))

    def _flush(self, report: list[tuple[str, int, str]]) -> None:
        # A stage's rows are those of its last operator.
        stages = {label: (done, total) for label, (_, done, total) in zip(stage_labels([op for op, _, _ in report], self.stages), report)}
        elapsed = self.clock() - self.started
        for stage, (done, total) in stages.items():
            state = f"{done}/{total} rows"
            if self.last.get(stage) != state:
                self.last[stage] = state
                self.emit(f"[{elapsed:5.0f} s] {stage}: {state}")


class _Router(io.TextIOBase):
    """The stand-in for sys.stdout or sys.stderr: every write to the log file, relayed lines nowhere else
    (the wave's progress to `progress`), the rest to the console too."""

    def __init__(self, console: TextIO, log: TextIO, progress: ProgressLines | None):
        self.console, self.log, self.progress = console, log, progress
        self.relayed = False  # the last write was a relayed line (its "\n" follows it)

    def write(self, text: str) -> int:
        self.log.write(text)
        match = RELAY_PREFIX.match(text)
        if match:
            self.relayed = True
            if self.progress is not None and (match["source"] or "").startswith(WAVE_TASK):
                self.progress.line(text[match.end() :].rstrip("\n"))
        elif not (self.relayed and text == "\n"):
            self.relayed = False
            self.console.write(text)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:  # a child process started with our streams writes to the console itself
        return self.console.fileno()

    @property
    def encoding(self):
        return self.console.encoding


class RunConsole:
    """Routes this process's output as the module says while open; `log_path` is where the log goes.
    `stages` (name, its operators) name the progress lines; none: Ray Data's reports go to the log only."""

    def __init__(self, log_path: str, stages: list[tuple[str, tuple[str, ...]]] | None = None):
        self.log_path, self.stages = log_path, stages

    def __enter__(self) -> RunConsole:
        import ray.data  # noqa: F401  Ray's and Ray Data's loggers get their handlers at import

        self.log = open(self.log_path, "a", encoding="utf-8", buffering=1)
        self.saved = sys.stdout, sys.stderr
        console_out, console_err = self.saved
        progress = None
        if self.stages is not None and not console_out.isatty():
            progress = ProgressLines(self.stages, lambda line: print(line, file=console_out, flush=True))
        sys.stdout = _Router(console_out, self.log, progress)
        sys.stderr = _Router(console_err, self.log, progress)
        # Logging: every record to the log file; on the console (the root logger's handlers) only this
        # tool's and errors. Ray's own logger (not propagating) to the log file only.
        self.file_handler = logging.StreamHandler(self.log)
        self.file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.file_handler.setLevel(logging.INFO)
        root = logging.getLogger()
        self.console_handlers = list(root.handlers)
        for handler in self.console_handlers:
            handler.addFilter(_ours_or_errors)
        root.addHandler(self.file_handler)
        self.separate = [logger for logger in _loggers() if not logger.propagate and logger.handlers]
        for logger in self.separate:  # Ray's and Ray Data's (made at import), which reach no root handler
            for handler in logger.handlers:
                if _to_console(handler):
                    handler.addFilter(_none)
            logger.addHandler(self.file_handler)
        return self

    def __exit__(self, *exc) -> None:
        for logger in self.separate:
            logger.removeHandler(self.file_handler)
            for handler in logger.handlers:
                handler.removeFilter(_none)
        root = logging.getLogger()
        root.removeHandler(self.file_handler)
        for handler in self.console_handlers:
            handler.removeFilter(_ours_or_errors)
        sys.stdout, sys.stderr = self.saved
        self.log.close()


def _loggers() -> list[logging.Logger]:
    return [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]


def _to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _none(record: logging.LogRecord) -> bool:
    return False


def _ours_or_errors(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == "synthalign_ray" or record.levelno >= logging.ERROR


@contextmanager
def run_console(output: str, command: str, stages: list[tuple[str, tuple[str, ...]]] | None, verbose: bool) -> Iterator[str | None]:
    """A `RunConsole` around a Ray run into `output` (none when `verbose`: all goes to the console), its log
    at OUTPUT/logs/COMMAND-TIME-PID.log (yielded); written there as it goes where the output is a local
    folder, else copied there at the end. Ray is shut down inside, so its workers' last lines (actors
    exiting) go to the log too."""
    if verbose:
        yield None
        return
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    uri = store.join(output, LOGS_FOLDER, name)
    local = "://" not in output
    log_path = store.filesystem(uri)[1] if local else os.path.join(tempfile.gettempdir(), name)
    if local:
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
        except OSError:  # not a folder: the command says what is wrong with it; the log goes beside
            uri, log_path = None, os.path.join(tempfile.gettempdir(), name)
    try:
        with RunConsole(log_path, stages):
            try:
                yield log_path if local or uri is None else uri  # an object store's copy is made at the end
            finally:
                import ray

                ray.shutdown()
    finally:
        if not local and uri is not None and os.path.exists(log_path):
            try:
                with open(log_path, "rb") as log:
                    store.write_bytes(uri, log.read())
                os.remove(log_path)
            except OSError as error:
                print(f"log: could not be copied to {uri} ({error}); it is at {log_path}", file=sys.stderr)
