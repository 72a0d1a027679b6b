"""In-process stand-ins for the two ends of a weight sync, for tests that run a real gloo group in threads.

`Sender` is the learners' `WeightSenderMixin` over a plain module (in place of a DeepSpeed engine's
`engine.module`); `Receiver` is the workers' `TorchWeightReceiver` over a plain module; `run_together`
runs each side in its own thread, as the collective needs, and returns their results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from actors.weight_receiver import TorchWeightReceiver
from learners.weight_sender import WeightSenderMixin


class Sender(WeightSenderMixin):
    def __init__(self, module: torch.nn.Module) -> None:
        self.engine, self.rank = SimpleNamespace(module=module), 0


class Receiver(TorchWeightReceiver):
    def __init__(self, module: torch.nn.Module) -> None:
        self.transformer, self._version = module, 0


def run_together(*fns: Callable[[], Any]) -> list[Any]:
    """Run every function in its own thread (a collective needs all ranks at once); raise on any error."""
    results, errors = [None] * len(fns), []

    def run(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results
