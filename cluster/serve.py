"""Try a trained R3 policy over HTTP: `python -m cluster.serve --config FILE [--checkpoint DIR]`.

Also `serve run cluster.serve:app config=FILE [checkpoint=DIR]` (Ray Serve's CLI; it binds
Serve's default address). One Serve app, ingress FastAPI:

- `GET /`: a web page (prompt box, rounds control, rounds shown one by one as they finish);
- `POST /v1/r3`: `cluster.serve_api.R3Request` -> `R3Response`, or server-sent events with `stream: true`;
- `GET /v1/health`: the weight version and how many pool calls merged concurrent requests;
- `GET /openapi.json`, `GET /docs`: the schema.

The replica builds the rollout workers and judge of the config exactly as `cluster.eval` does
(`cluster.policy_session`), with the checkpoint's weights, and answers each request with the
evaluation's multi-round chain. Bad input gets 400/422 naming the field, a request past its timeout
504; neither disturbs other requests. Binds 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from cluster.config import ConfigError, R3Config, load_config
from cluster.serve_api import (
    ErrorBody,
    R3Request,
    R3Response,
    RequestRejected,
    check_limits,
    response_for,
    round_out,
    validation_errors,
)

__all__ = ["app", "build_app", "R3Service", "main", "APP_NAME"]

log = logging.getLogger("r3rl.serve")
APP_NAME = "r3"
DEFAULT_CONFIG = "configs/cpu_tiny.yaml"
_PAGE = Path(__file__).with_name("web") / "index.html"
_ERRORS = {s: {"model": ErrorBody} for s in (400, 422, 500, 504)}

api = FastAPI(title="R3RL", version="1", description="Reason, reflect, refine: one prompt, up to 8 rounds.")


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(validation_errors(list(exc.errors())))


@api.exception_handler(RequestRejected)
async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
    return _error_response(exc)


def _error_response(exc: RequestRejected) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.body.status)


def _timed_out(timeout: float) -> RequestRejected:
    return RequestRejected(504, f"the request ran past its timeout of {timeout:g} s; its chain stops at the next "
                                "round (ask for fewer rounds, or raise timeout_s up to serve.request_timeout_s)",
                           [])


def _sse(event: str, payload: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n"


@serve.deployment(name="R3Service")
@serve.ingress(api)
class R3Service:
    """One replica: the policy's workers and judge, and the HTTP routes."""

    def __init__(self, cfg: R3Config, checkpoint: str | None):
        from cluster.policy_session import PolicySession
        from cluster.serve_batching import RoleBatcher
        from rollout.plugins import load_plugins

        load_plugins(cfg.plugins)  # this process resolves the config's names too (tiny:<name>, judge kinds)
        self.cfg, s = cfg, cfg.serve
        self.session = PolicySession(cfg, Path(checkpoint) if checkpoint else None).start()
        self.batcher = RoleBatcher(self.session.reasoner(), self.session.generator(),
                                   max_batch_size=s.max_batch_size, batch_wait_s=s.batch_wait_s)
        self._chains = ThreadPoolExecutor(max_workers=s.max_concurrent_requests, thread_name_prefix="r3-chain")
        self._page = _PAGE.read_text()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)

    @api.get("/v1/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "weight_version": self.session.version,
                "checkpoint": str(self.session.checkpoint) if self.session.checkpoint else None,
                "pool_calls": dict(self.batcher.calls), "largest_batch": dict(self.batcher.largest_batch)}

    @api.post("/v1/r3", response_model=R3Response, responses=_ERRORS)
    async def r3(self, req: R3Request) -> Any:
        """Run up to `max_rounds` R3 rounds on `prompt`; `stream: true` sends each round as an SSE event."""
        s = self.cfg.serve
        check_limits(req, s.max_prompt_chars, s.request_timeout_s)
        loop = asyncio.get_running_loop()
        self.batcher.bind_loop(loop)
        timeout = req.timeout_s or s.request_timeout_s
        cancelled = threading.Event()
        if req.stream:
            return StreamingResponse(self._events(req, timeout, cancelled), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        chain = loop.run_in_executor(self._chains, lambda: self._run(req, cancelled, None))
        try:
            trajectory = await asyncio.wait_for(chain, timeout)
        except TimeoutError:
            cancelled.set()
            return _error_response(_timed_out(timeout))
        except Exception as e:  # a worker pool that gave up, a judge app gone: this request fails, not the server
            log.exception("request failed")
            return _error_response(RequestRejected(500, f"{type(e).__name__}: {e}"))
        return response_for(req, trajectory, self.session.version)

    async def _events(self, req: R3Request, timeout: float, cancelled: threading.Event) -> Any:
        """`event: round` per finished round, then `event: done` (the whole response) or `event: error`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_round(rnd: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, rnd)

        chain = loop.run_in_executor(self._chains, lambda: self._run(req, cancelled, on_round))
        chain.add_done_callback(lambda _: queue.put_nowait(None))
        deadline = loop.time() + timeout
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    cancelled.set()
                    yield _sse("error", _timed_out(timeout).body.model_dump())
                    return
                if item is not None:
                    yield _sse("round", round_out(item).model_dump())
                    continue
                if chain.exception() is not None:
                    e = chain.exception()
                    yield _sse("error", ErrorBody(error=f"{type(e).__name__}: {e}", status=500).model_dump())
                else:
                    yield _sse("done", response_for(req, chain.result(), self.session.version).model_dump())
                return
        finally:
            cancelled.set()  # a client that hung up stops its chain at the next round

    def _run(self, req: R3Request, cancelled: threading.Event, on_round: Any) -> Any:
        return self.session.run(req.prompt, req.max_rounds, req.seed, req.temperature, on_round=on_round,
                                cancelled=cancelled, reasoner=self.batcher.reasoner(),
                                generator=self.batcher.generator())

    def __del__(self) -> None:
        for closer in (lambda: self.batcher.shutdown(), lambda: self._chains.shutdown(wait=False),
                       lambda: self.session.shutdown()):
            try:
                closer()
            except Exception:  # replica teardown: best effort
                pass


def build_app(cfg: R3Config, checkpoint: Path | None) -> Any:
    """The Serve application for `cfg` (one replica; it holds no CPUs itself: its workers and judge do)."""
    from cluster.session import ENGINE_ENV

    return R3Service.options(
        max_ongoing_requests=cfg.serve.max_concurrent_requests,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(ENGINE_ENV)}},
    ).bind(cfg, str(checkpoint) if checkpoint else None)


def app(args: dict[str, str]) -> Any:
    """`serve run cluster.serve:app config=FILE [checkpoint=DIR] [overrides="a.b=c d.e=f"]`."""
    from cluster.policy_session import resolve_checkpoint

    unknown = sorted(set(args) - {"config", "checkpoint", "overrides"})
    if unknown:
        raise ValueError(f"unknown serve run arguments {unknown}; allowed: config, checkpoint, overrides")
    cfg = load_config(args.get("config", DEFAULT_CONFIG), args.get("overrides", "").split(), check_paths=True)
    return build_app(cfg, resolve_checkpoint(cfg, args.get("checkpoint")))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m cluster.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--checkpoint", default=None, help="a complete checkpoint folder or 'auto' (default: the config's models)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("overrides", nargs="*", help="config overrides a.b=c")
    args = ap.parse_args(argv)
    try:
        from cluster.policy_session import resolve_checkpoint

        cfg = load_config(args.config, args.overrides, check_paths=True)
        checkpoint = resolve_checkpoint(cfg, args.checkpoint)
        if not 1 <= args.port <= 65535:
            raise ConfigError(f"--port {args.port}: use 1..65535")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    from cluster.session import connect_ray

    started = connect_ray(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(cfg, checkpoint), name=APP_NAME, route_prefix="/")
        print(f"R3RL serving {checkpoint or 'the config models'} at http://{args.host}:{args.port}/ "
              f"(API: POST /v1/r3, schema: /openapi.json); Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
