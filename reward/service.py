"""Ray Serve deployment for any judge: dynamic batching, replicas or autoscaling, HTTP on loopback.

The judge is built inside each replica from a factory spec (`reward.registry.build_judge`), so a
VLM engine lives in the replica, not in the driver. Concurrent single-item requests are gathered
by `@serve.batch` (max batch size and wait configurable) into one `judge.score(items)` call.

Callers: `ServeJudgeClient` (implements `rollout.interfaces.Judge`; driver or actors) through a
deployment handle with a per-request timeout and bounded retries; a request that still fails
yields the defined error result and the caller goes on. Outside tools: HTTP `POST
{route_prefix}/score` with `{"items": [{"image_png_b64", "prompt", "metadata"}]}` (base64 PNG or
a PNG data URL) -> `{"results": [{"score", "correct", "details", "raw", "error"}]}`.

Metrics (`ray.util.metrics`, visible in the dashboard's Prometheus): `r3rl_judge_items_total`
{judge, outcome}, `r3rl_judge_failures_total` {judge, kind}, `r3rl_judge_batch_size` {judge} in
replicas; `r3rl_judge_client_failures_total` {judge, kind} in clients.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import time
from collections import Counter as _Tally
from typing import Any

import numpy as np
from ray import serve

from reward.judge_modes import error_result, failure_kind
from reward.registry import build_judge
from rollout.interfaces import JudgeItem, JudgeResult
from rollout.ports import free_port

__all__ = ["JudgeDeployment", "ServeJudgeClient", "deploy_judge", "deployment_options", "start_serve"]

log = logging.getLogger(__name__)


class JudgeDeployment:
    """Serve replica body: builds the judge from `judge_spec` and scores batches of items.

    Args:
        judge_spec: `{"kind": ..., **kwargs}` for `build_judge`.
        max_batch_size: most items per `judge.score` call.
        batch_wait_timeout_s: how long a partial batch waits for more items.
        judge_name: metric tag.
    """

    def __init__(
        self, judge_spec: dict[str, Any], *, max_batch_size: int, batch_wait_timeout_s: float, judge_name: str
    ) -> None:
        from ray.util import metrics

        self._judge = build_judge(judge_spec)
        self._name = judge_name
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        tags = ("judge", "outcome")
        self._items = metrics.Counter("r3rl_judge_items_total", "items scored by a judge replica", tags)
        self._failures = metrics.Counter(
            "r3rl_judge_failures_total", "items a judge could not score", ("judge", "kind")
        )
        self._batch = metrics.Histogram(
            "r3rl_judge_batch_size", "items per judge call", [1, 2, 4, 8, 16, 32, 64], ("judge",)
        )
        self._stats = {"calls": 0, "items": 0, "failures": _Tally()}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def score_batch(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """One `judge.score` call for a batch gathered from concurrent requests."""
        try:
            results = await asyncio.to_thread(self._judge.score, items)
        except Exception as e:  # a judge must not raise; if it does, every item gets the reason
            log.exception("judge %s raised", self._name)
            results = [error_result(f"judge raised {type(e).__name__}: {e}") for _ in items]
        self._record(results)
        return results

    async def score(self, item: JudgeItem) -> JudgeResult:
        """Score one item (batched with concurrent calls)."""
        return await self.score_batch(item)

    async def score_items(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """Score several items in one request; each joins the batch queue on its own."""
        return list(await asyncio.gather(*(self.score_batch(it) for it in items)))

    def stats(self) -> dict[str, Any]:
        """This replica's counts: calls, items and failures by kind."""
        return {**self._stats, "failures": dict(self._stats["failures"])}

    async def __call__(self, request: Any) -> Any:
        """HTTP: `POST {route_prefix}/score`."""
        from starlette.responses import JSONResponse

        if not request.url.path.rstrip("/").endswith("/score"):
            return JSONResponse(
                {"error": f"unknown path {request.url.path!r}; use POST /score"}, status_code=404
            )
        if request.method != "POST":
            return JSONResponse({"error": "use POST"}, status_code=405)
        try:
            items = _items_from_json(await request.body())
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        results = await asyncio.gather(*(self.score_batch(it) for it in items))
        payload = {"results": [_result_json(r) for r in results]}
        return JSONResponse(json.loads(json.dumps(payload, default=str)))

    def __del__(self) -> None:
        shutdown = getattr(getattr(self, "_judge", None), "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # interpreter teardown: nothing left to report to
                pass

    def _record(self, results: list[JudgeResult]) -> None:
        self._stats["calls"] += 1
        self._stats["items"] += len(results)
        self._batch.observe(len(results), tags={"judge": self._name})
        for r in results:
            outcome = "ok" if r.error is None else "error"
            self._items.inc(1, tags={"judge": self._name, "outcome": outcome})
            if r.error is not None:
                kind = failure_kind(r.error)
                self._stats["failures"][kind] += 1
                self._failures.inc(1, tags={"judge": self._name, "kind": kind})


class ServeJudgeClient:
    """A `Judge` that scores items through the Serve app `app_name`.

    Items go out in requests of at most `items_per_request` (each request's items join the
    replica's batch queue one by one, so they are batched together with other callers' items;
    several requests spread over replicas). One round trip per request instead of per item keeps
    the service's cost low when the judge itself is fast.

    Args:
        app_name: the Serve application (as given to `deploy_judge`).
        timeout_s: per-request deadline, counted from submission.
        max_retries: re-submissions of a request that timed out or failed.
        items_per_request: most items per request (1: one request per item).
    """

    def __init__(
        self, app_name: str, *, timeout_s: float = 60.0, max_retries: int = 1, items_per_request: int = 16
    ) -> None:
        if timeout_s <= 0 or max_retries < 0 or items_per_request < 1:
            raise ValueError(
                f"need timeout_s > 0, max_retries >= 0, items_per_request >= 1; got "
                f"{timeout_s}, {max_retries}, {items_per_request}"
            )
        self.app_name = app_name
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._per_request = items_per_request
        self._handle = None
        self._counter = None
        self.failures: _Tally = _Tally()

    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """One result per item; a request that fails on every attempt gives its items error results."""
        results: list[JudgeResult | None] = [None] * len(items)
        chunks = [
            list(range(i, min(i + self._per_request, len(items))))
            for i in range(0, len(items), self._per_request)
        ]
        errors: dict[int, str] = {}
        pending = list(range(len(chunks)))
        for attempt in range(self._max_retries + 1):
            if not pending:
                break
            handle = self._get_handle()
            start = time.monotonic()
            responses = {c: handle.score_items.remote([items[i] for i in chunks[c]]) for c in pending}
            failed = []
            for c, resp in responses.items():
                remaining = max(0.0, self._timeout_s - (time.monotonic() - start))
                try:
                    for i, r in zip(chunks[c], resp.result(timeout_s=remaining), strict=True):
                        results[i] = r
                except TimeoutError:
                    resp.cancel()
                    errors[c] = f"serve timeout after {self._timeout_s}s"
                    failed.append(c)
                except Exception as e:  # replica died, request cancelled, ...
                    errors[c] = f"serve error: {type(e).__name__}: {e}"
                    failed.append(c)
            if failed:
                log.warning(
                    "judge %s: %d/%d requests failed (attempt %d)",
                    self.app_name,
                    len(failed),
                    len(pending),
                    attempt + 1,
                )
            pending = failed
        for c in pending:
            reason = f"{errors[c]} ({self._max_retries + 1} attempts)"
            for i in chunks[c]:
                results[i] = error_result(reason)
                self._count_failure(failure_kind(reason))
        return [r for r in results if r is not None]

    def _get_handle(self):
        if self._handle is None:
            self._handle = serve.get_app_handle(self.app_name)
        return self._handle

    def _count_failure(self, kind: str) -> None:
        self.failures[kind] += 1
        if self._counter is None:
            from ray.util import metrics

            self._counter = metrics.Counter(
                "r3rl_judge_client_failures_total",
                "judge requests that failed at the client",
                ("judge", "kind"),
            )
        self._counter.inc(1, tags={"judge": self.app_name, "kind": kind})

    def __getstate__(self) -> dict[str, Any]:  # ship to actors without the handle / metric objects
        return {**self.__dict__, "_handle": None, "_counter": None}


def start_serve(*, host: str = "127.0.0.1", port: int | None = None, http: bool = True) -> int | None:
    """Start Serve with its HTTP proxy on `host:port` (a free port when None); returns the port.

    `http=False` starts Serve without any proxy (None is returned): the driver reaches the judge
    through a deployment handle only, which saves the proxy actor's start-up (several seconds, and
    its readiness check fails on a saturated 2-core machine).
    """
    if not http:
        serve.start(proxy_location="Disabled")
        return None
    port = free_port(host) if port is None else port
    serve.start(http_options={"host": host, "port": port})
    return port


def deploy_judge(
    judge_spec: dict[str, Any],
    *,
    name: str = "judge",
    route_prefix: str | None = "/{name}",
    num_replicas: int | None = 1,
    autoscaling: dict[str, Any] | None = None,
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.05,
    max_ongoing_requests: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    runtime_env: dict[str, Any] | None = None,
) -> Any:
    """Deploy `judge_spec` as the Serve app `name`; returns its deployment handle.

    Exactly one of `num_replicas` / `autoscaling` (`{"min_replicas", "max_replicas",
    "target_ongoing_requests"?}`) is used. `max_ongoing_requests` defaults to twice the batch size
    so that a replica can fill a batch (Serve's own default of 5 would cap batches at 5).
    `num_cpus` / `num_gpus` are each replica's Ray resources (a judge whose engine is tensor
    parallel over N GPUs needs num_gpus=N: its workers run on the replica's GPUs). `runtime_env` (e.g. `{"env_vars": {"OMP_NUM_THREADS": "1"}}`) applies to the replicas. Call
    `start_serve` first to choose the HTTP address (else Serve's default applies).
    `route_prefix` is the app's HTTP route (`{name}` is filled in); None gives it none, for a
    Serve without a proxy, where only deployment handles reach it (Serve would otherwise announce
    an HTTP address that nothing serves).
    """
    options = deployment_options(
        name=name, num_replicas=num_replicas, autoscaling=autoscaling, max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s, max_ongoing_requests=max_ongoing_requests, num_cpus=num_cpus,
        num_gpus=num_gpus, runtime_env=runtime_env,
    )
    app = (
        serve.deployment(JudgeDeployment)
        .options(**options)
        .bind(
            dict(judge_spec),
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            judge_name=name,
        )
    )
    return serve.run(app, name=name, route_prefix=None if route_prefix is None else route_prefix.format(name=name))


def deployment_options(
    *, name: str, num_replicas: int | None, autoscaling: dict[str, Any] | None, max_batch_size: int,
    batch_wait_timeout_s: float, max_ongoing_requests: int | None, num_cpus: float, num_gpus: float,
    runtime_env: dict[str, Any] | None,
) -> dict[str, Any]:
    """The `serve.deployment(...).options(...)` of `deploy_judge` (pure; raises ValueError on bad values)."""
    if (num_replicas is None) == (autoscaling is None):
        raise ValueError(
            f"give exactly one of num_replicas ({num_replicas!r}) and autoscaling ({autoscaling!r})"
        )
    if num_replicas is not None and num_replicas < 1:
        raise ValueError(f"num_replicas {num_replicas} must be >= 1")
    if max_batch_size < 1 or batch_wait_timeout_s < 0:
        raise ValueError(f"max_batch_size {max_batch_size} must be >= 1, batch_wait_timeout_s >= 0")
    if num_cpus < 0 or num_gpus < 0:
        raise ValueError(f"num_cpus {num_cpus} and num_gpus {num_gpus} must be >= 0")
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus > 0:
        actor["num_gpus"] = num_gpus
    if runtime_env:
        actor["runtime_env"] = runtime_env
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": max_ongoing_requests or 2 * max_batch_size,
        "ray_actor_options": actor,
    }
    if autoscaling is not None:
        if not {"min_replicas", "max_replicas"} <= set(autoscaling):
            raise ValueError(f"autoscaling {autoscaling!r} needs min_replicas and max_replicas")
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = num_replicas
    return options


def _items_from_json(body: bytes) -> list[JudgeItem]:
    try:
        payload = json.loads(body)
        raw_items = payload["items"]
        if not isinstance(raw_items, list) or not raw_items:
            raise ValueError("'items' must be a non-empty list")
        return [_item_from_json(x) for x in raw_items]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"bad request ({type(e).__name__}: {e}); expected {{'items': [{{'image_png_b64', 'prompt', 'metadata'?}}]}}"
        ) from e


def _item_from_json(x: dict[str, Any]) -> JudgeItem:
    from PIL import Image, UnidentifiedImageError

    data = x["image_png_b64"]
    if data.startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB"))
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image_png_b64 is not a base64 PNG ({e})") from e
    return JudgeItem(image=image, prompt=str(x["prompt"]), metadata=dict(x.get("metadata") or {}))


def _result_json(r: JudgeResult) -> dict[str, Any]:
    return {"score": r.score, "correct": r.correct, "details": r.details, "raw": r.raw, "error": r.error}
