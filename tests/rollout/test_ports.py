"""`rollout.ports.free_port`: a bindable port, below the kernel's ephemeral range."""

from __future__ import annotations

import random
import socket

from rollout import ports


def test_free_port_is_bindable_and_below_the_ephemeral_range():
    first, _ = ports.ephemeral_range()
    for seed in range(20):
        port = ports.free_port("127.0.0.1", random.Random(seed))
        assert 10_000 <= port < first
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free


def test_a_taken_port_is_never_returned():
    rng_seed = 3
    taken = ports.free_port("127.0.0.1", random.Random(rng_seed))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        # the same random draws would give `taken` first; it is skipped while held
        assert ports.free_port("127.0.0.1", random.Random(rng_seed)) != taken


def test_no_room_below_the_range_falls_back_to_the_kernels_pick(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (10_500, 60999))
    port = ports.free_port("127.0.0.1")
    assert port > 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
