"""The R3 inference app on the tiny models, for the Serve and browser tests: one start per test module.

`running_app(overrides)` starts a local Ray cluster (as `python -m cluster.serve` does), Serve's HTTP
proxy on a free loopback port and the app, yields its base URL and takes everything down again.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Tiny models with few denoising steps and short answers: a round takes seconds on 2 cores.
TINY_OVERRIDES = [
    "flow_grpo.eval_num_steps=2",
    "flow_grpo.edit_num_steps=2",
    "grpo.max_tokens=16",
    "serve.max_prompt_chars=200",
    "serve.request_timeout_s=600",
]


@contextmanager
def running_app(overrides: list[str] = ()) -> Iterator[str]:
    import ray
    from ray import serve

    from cluster.config import load_config
    from cluster.serve import APP_NAME, build_app
    from cluster.session import connect_ray
    from rollout import ports

    cfg = load_config("configs/cpu_tiny.yaml", [*TINY_OVERRIDES, *overrides], check_paths=True)
    started = connect_ray(cfg)
    port = ports.free_port("127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg, None), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()


def decode_png(b64: str) -> Any:
    """base64 PNG -> (H, W, 3) uint8 array (raises if it is not a PNG)."""
    import numpy as np
    from PIL import Image

    data = base64.b64decode(b64, validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_events(response: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a server-sent-event response, in order."""
    events, event, data = [], None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif line == "" and event is not None:
            events.append((event, json.loads("".join(data))))
            event, data = None, []
    return events
