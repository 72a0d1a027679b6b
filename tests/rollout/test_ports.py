"""`rollout.ports.free_port`: a bindable port, below the kernel's ephemeral range."""

from __future__ import annotations

import random
import socket

from rollout import ports


def test_free_port_is_bindable_and_below_the_ephemeral_range(monkeypatch):
    monkeypatch.setattr(ports, "_handed_out", set())  # this test's draws stay out of the process's record
    first, _ = ports.ephemeral_range()
    for seed in range(20):
        port = ports.free_port("127.0.0.1", random.Random(seed))
        assert 20_000 <= port < first  # above Ray's default worker ports (10002-19999)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free


def test_a_taken_port_and_one_given_out_before_are_never_returned(monkeypatch):
    monkeypatch.setattr(ports, "_handed_out", set())
    first = ports.free_port("127.0.0.1", random.Random(3))
    # the same random draws would give `first` again: it was given out, so the next draw is taken
    second = ports.free_port("127.0.0.1", random.Random(3))
    assert second != first
    monkeypatch.setattr(ports, "_handed_out", set())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", first))
        holder.listen()
        # not given out in this process now, but bound by another socket: skipped while held
        assert ports.free_port("127.0.0.1", random.Random(3)) != first


def test_no_room_below_the_range_falls_back_to_the_kernels_pick(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (20_500, 60999))
    port = ports.free_port("127.0.0.1")
    assert port > 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
