"""What a person watching a run sees: a progress bar, a line per evaluation and a summary.

A run starts Ray, vLLM, DeepSpeed, diffusers and Serve, which together print hundreds of lines of
engine logs. `Console.quiet(log_path)` sends all of that, at the file-descriptor level (so output of
native code and of the lines Ray forwards from its actors are caught too), to a log file in the run
directory and keeps a private handle on the real terminal for the lines meant for a person.
`Console.verbose()` leaves the terminal alone (the `--verbose` flag of the entry points).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["Console", "format_round_accuracy"]

log = logging.getLogger(__name__)


class Console:
    """The person-facing output of one run.

    Lifecycle: build it with `Console.verbose()` or enter `Console.quiet(path)`, pass it to the code
    that reports progress, and print the final summary with `line`. Every method is safe to call
    when the console is verbose (then it is plain stdout).
    """

    def __init__(self, stream: IO[str], log_path: Path | None = None) -> None:
        self.stream = stream
        self.log_path = log_path  # where engine logs go; None: to the terminal
        self._started = time.perf_counter()

    @classmethod
    def verbose(cls) -> Console:
        """A console that is stdout, with the engine logs left on the terminal."""
        return cls(sys.stdout)

    @classmethod
    @contextlib.contextmanager
    def quiet(cls, log_path: Path) -> Iterator[Console]:
        """Redirect stdout and stderr (file descriptors 1 and 2) to `log_path` while inside.

        `sys.stdout`/`sys.stderr` also point at the log while inside, so logging handlers, `print`, C
        extensions and subprocesses started inside all land in it, whatever those objects were. The console
        writes to a duplicate of the original stdout. Both descriptors are restored on exit, also
        when the body raises, so a traceback reaches the terminal.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved_out, saved_err = os.dup(1), os.dup(2)
        terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
        py_out, py_err = sys.stdout, sys.stderr
        with open(log_path, "a", encoding="utf-8", buffering=1) as logfile:
            os.dup2(logfile.fileno(), 1)
            os.dup2(logfile.fileno(), 2)
            # Python-level writers too (Ray prints its actors' lines to whatever `sys.stdout` is at
            # the time, which is not fd 1 under pytest's capture or in a notebook).
            sys.stdout = sys.stderr = logfile
            try:
                yield cls(terminal, log_path)
            finally:
                sys.stdout, sys.stderr = py_out, py_err
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved_out, 1)
                os.dup2(saved_err, 2)
                os.close(saved_out)
                os.close(saved_err)
                terminal.close()

    @property
    def is_quiet(self) -> bool:
        return self.log_path is not None

    def line(self, text: str = "") -> None:
        """One line for the person watching (also copied to the log when quiet, to keep its order)."""
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.is_quiet:
            log.info("%s", text)

    def elapsed(self) -> float:
        """Seconds since the console was made."""
        return time.perf_counter() - self._started

    def progress(self, total: int, initial: int = 0, desc: str = "R3RL", enabled: bool = True) -> Any:
        """A tqdm bar on the terminal (not in the log)."""
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", file=self.stream,
                    disable=not enabled, dynamic_ncols=True)


def format_round_accuracy(accuracies: Sequence[float]) -> str:
    """`"round 0 12.5 % | round 1 15.0 %"` for per-round accuracies in [0, 1]."""
    return " | ".join(f"round {r} {100 * a:.1f} %" for r, a in enumerate(accuracies))
