"""A free TCP port for a server this process starts: a torch.distributed rendezvous, a weight-sync
group, Serve's HTTP proxy.

Why not the usual `bind(("", 0))`: the kernel answers from its ephemeral range
(`/proc/sys/net/ipv4/ip_local_port_range`, 32768-60999 by default), the range every outgoing
connection on the host also takes its local port from, and a Ray node opens many. Between the probe
and the server's own bind another socket can take the port, and the server fails with EADDRINUSE.
Below that range a port is only ever taken by an explicit bind, so the probe's answer stays free
unless another server picks the same one of several thousand ports. The draw starts at 20000, above
the ports Ray's workers bind by default (`--min-worker-port 10002` to `--max-worker-port 19999`),
which Ray also refuses to give any other of its components.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port", "ephemeral_range"]

_LOWEST = 20_000  # below: Ray's default worker ports (10002-19999), well-known and registered services
_TRIES = 200
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()  # ports this process gave out: two servers it starts never share a draw


def ephemeral_range() -> tuple[int, int]:
    """(first, last) port of the kernel's ephemeral range; Linux's default where it cannot be read."""
    try:
        first, last = (int(v) for v in _EPHEMERAL_RANGE_FILE.read_text().split())
        return first, last
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "", rng: random.Random | None = None) -> int:
    """A TCP port that `host` ("" = every interface) can bind now, drawn at random below the
    ephemeral range, skipping the ports this process drew before, when that range leaves room
    (else the kernel's pick)."""
    rng = rng or random.Random()
    first, _ = ephemeral_range()
    if first - _LOWEST >= 1000:
        for _ in range(_TRIES):
            port = rng.randrange(_LOWEST, first)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
