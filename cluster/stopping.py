"""A clean stop on SIGTERM (what `ray job stop` sends) or SIGINT (Ctrl-C): finish or abandon, checkpoint, exit.

The signal handler only records the request (a Python handler must not raise while Ray waits in C:
Ray would hand back a `SystemError` much later). The driver polls `GracefulStop.requested` between
steps, and waits for the long, resumable parts of a step through `GracefulStop.wait`:

- a step's rollout (the step has not touched the learners yet) runs on for at most `train.stop_grace_s`
  after the signal, then it is abandoned: its metrics row is never written, and the checkpoint holds
  the data cursor and rollout buffer of the step's start, so a resume redoes that step;
- once the learners have begun a step's update, the step finishes (each of its waits is bounded by
  `train.remote_timeout_s`): a half-applied update cannot be checkpointed;
- an evaluation is abandoned at once (it changes nothing a resume needs).

Then the driver writes a checkpoint of the last completed step, shuts the roles and Ray down, and
`python -m cluster.train` exits 143 (SIGTERM) or 130 (SIGINT). A second signal exits at once with
that status, skipping the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["GracefulStop", "StopRequested", "signal_exit_code"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_POLL_S = 0.5
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_exit_code(signum: int) -> int:
    """The shell convention for a process ended by a signal: 128 + its number (143 SIGTERM, 130 SIGINT)."""
    return 128 + int(signum)


class StopRequested(BaseException):
    """Unwinds the run after a stop signal (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it). `abandoned` names what was cut short, if anything."""

    def __init__(self, signum: int, abandoned: str | None = None):
        self.signum, self.abandoned = int(signum), abandoned
        super().__init__(f"{signal.Signals(signum).name} received" + (f"; abandoned {abandoned}" if abandoned else ""))


class GracefulStop:
    """Records SIGTERM/SIGINT for the run's life; `install()` (main thread only) and `restore()`.

    Args:
        grace_s: how long a step's rollout may run on after the signal (`train.stop_grace_s`).
        notify: called with one line for the console when the first signal arrives.
    """

    def __init__(self, grace_s: float, notify: Callable[[str], None] | None = None):
        self.grace_s = float(grace_s)
        self.signum: int | None = None
        self.received_at: float | None = None
        self._notify = notify
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> bool:
        """Take over SIGTERM and SIGINT (after `ray.init`, which installs its own SIGTERM handler).
        Returns False (and does nothing) outside the main thread, where Python allows no handlers."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM/SIGINT keep their default handlers (no clean stop)")
            return False
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def check(self, abandoned: str | None = None) -> None:
        """Raise `StopRequested` if a stop was requested."""
        if self.signum is not None:
            raise StopRequested(self.signum, abandoned)

    def wait(self, fn: Callable[[], T], what: str, grace_s: float | None = None) -> T:
        """Run `fn` in a thread and return its result, unless a stop signal came and `grace_s` (default
        `train.stop_grace_s`; 0: at once) has passed since: then `fn` is abandoned (its thread runs on
        until the roles are shut down) and `StopRequested` is raised naming `what`."""
        grace = self.grace_s if grace_s is None else grace_s
        pool = ThreadPoolExecutor(1, thread_name_prefix=what.replace(" ", "-"))
        try:
            future: Future[T] = pool.submit(fn)
            while not wait([future], timeout=_POLL_S).done:
                if self.received_at is not None and time.monotonic() - self.received_at >= grace:
                    future.cancel()
                    log.warning("stop: abandoning %s (train.stop_grace_s=%g s passed)", what, grace)
                    raise StopRequested(self.signum or signal.SIGTERM, what)
            return future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # the second signal: no checkpoint, no cleanup
            self._say(f"{name} received again: exiting now without a checkpoint")
            sys.stderr.flush()
            os._exit(signal_exit_code(signum))
        self.signum, self.received_at = signum, time.monotonic()
        line = (f"{name} received: stopping cleanly (a step's rollout may run on for up to "
                f"train.stop_grace_s={self.grace_s:g} s, an update finishes), then a checkpoint; "
                f"send it again to exit at once")
        log.warning("%s", line)
        self._say(line)

    def _say(self, line: str) -> None:
        """To the person at the terminal (the console), else stderr; best effort inside a signal handler."""
        try:
            if self._notify is not None:
                self._notify(line)
            else:
                sys.stderr.write(line + "\n")
        except Exception:  # nothing more to do from inside a handler
            pass
