"""Cheap judges and wrappers that need no model: a constant judge (Serve smoke tests, measuring
the service's own overhead, timeouts via `delay_s`) and a wrapper that logs every `score` call
of any judge to a JSONL file (how batching is observed across Serve replicas)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rollout.interfaces import Judge, JudgeItem, JudgeResult

__all__ = ["ConstantJudge", "CallLogJudge", "read_call_log"]


class ConstantJudge:
    """Scores every item `score` after sleeping `delay_s` per call (not per item)."""

    def __init__(self, *, score: float = 1.0, delay_s: float = 0.0) -> None:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score {score} outside [0, 1]")
        if delay_s < 0:
            raise ValueError(f"delay_s {delay_s} must be >= 0")
        self._score = float(score)
        self._delay_s = float(delay_s)

    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        if self._delay_s:
            time.sleep(self._delay_s)
        return [JudgeResult(score=self._score, correct=self._score >= 1.0) for _ in items]


class CallLogJudge:
    """Forwards to `inner` and appends `{"pid", "n", "t", "s"}` per call to `path` (one JSON line): the
    process, the batch size, the call's start (epoch seconds) and the judge's own seconds for it (what a
    benchmark sets against the caller's wait to see the service's cost)."""

    def __init__(self, inner: Judge, *, path: str | os.PathLike[str]) -> None:
        self._inner = inner
        self._path = Path(path)

    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        started, start = time.time(), time.perf_counter()
        try:
            return self._inner.score(items)
        finally:  # also a failed call: it was made
            seconds = time.perf_counter() - start
            line = json.dumps({"pid": os.getpid(), "n": len(items), "t": started, "s": seconds}) + "\n"
            # One small O_APPEND write per call: lines from several processes do not interleave.
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def __getattr__(self, name: str):  # shutdown() etc. of the wrapped judge
        return getattr(self._inner, name)


def read_call_log(path: str | os.PathLike[str]) -> list[dict]:
    """The calls logged by `CallLogJudge` (empty when the file does not exist yet)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
