"""A judge behind an OpenAI-compatible chat endpoint (how the R3 paper hosts its 72B judge).

POSTs `{base_url}/chat/completions` (base_url like `http://host:8000/v1`) with the image as a PNG
data URL, using the same modes and prompts as the local VLM judge (`judge_modes`). vqascore asks
for `logprobs` + `top_logprobs` of a one-token answer. Standard library only (urllib).

Transport policy: at most `max_concurrency` requests in flight; each has `timeout_s`; timeouts,
connection errors, HTTP 429 and 5xx are retried up to `max_retries` times with exponential
back-off; other HTTP errors are not. One query never takes longer than `timeout_s x (max_retries + 1)`
in all (back-off included: the last attempt gets what is left), which the run's config keeps within
`train.remote_timeout_s`. The API key is read from the environment variable `api_key_env` at each
request; it is never stored, logged or put in an error message. An item whose request finally fails gets an error result
(never an exception), as does an unreadable response body.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from reward.judge_modes import (
    JudgePrompts,
    asked_checklist,
    check_mode,
    error_result,
    expected_answers,
    queries_for,
    result_from_answers,
    result_from_checklist,
    result_from_token_logprobs,
)
from reward.vlm_judge import validate_items
from rollout.interfaces import JudgeItem, JudgeResult

__all__ = ["RemoteJudge", "png_data_url", "RemoteError"]

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class RemoteError(Exception):
    """A request that failed for good (after retries); its message becomes the result's error."""


def png_data_url(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> `data:image/png;base64,...`."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class RemoteJudge:
    """Judge through an OpenAI-compatible `/chat/completions` endpoint.

    Args:
        base_url: API base, e.g. "http://127.0.0.1:8000/v1".
        model: model name sent in every request.
        mode: "checklist", "questions" or "vqascore".
        prompts: prompt templates (defaults: `JudgePrompts()`).
        api_key_env: name of an environment variable holding a bearer token (None: no auth).
        max_concurrency: requests in flight at once.
        timeout_s: per-request timeout (connect + read).
        max_retries: extra attempts after a retryable failure.
        retry_backoff_s: first back-off; doubles per retry.
        max_tokens, answer_max_tokens: answer budgets (checklist, per question).
        top_logprobs: log-probs requested for vqascore's one answer token.
        yes_threshold: vqascore above which `correct` is True.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        mode: str = "checklist",
        prompts: JudgePrompts | dict[str, str] | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        retry_backoff_s: float = 0.5,
        max_tokens: int = 256,
        answer_max_tokens: int = 8,
        top_logprobs: int = 20,
        yes_threshold: float = 0.5,
    ) -> None:
        self.mode = check_mode(mode)
        self.prompts = JudgePrompts(**prompts) if isinstance(prompts, dict) else (prompts or JudgePrompts())
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError(
                f"need max_concurrency >= 1, max_retries >= 0, timeout_s > 0; got "
                f"{max_concurrency}, {max_retries}, {timeout_s}"
            )
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"api_key_env={api_key_env!r} names an unset environment variable (or an empty one)")
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._api_key_env = api_key_env
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_s = retry_backoff_s
        self._max_tokens = max_tokens
        self._answer_max_tokens = answer_max_tokens
        self._top_logprobs = top_logprobs
        self._yes_threshold = yes_threshold
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="remote-judge")

    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """One result per item; failed requests and unreadable replies become error results.

        Raises:
            ValueError: an item whose image is not an (H, W, 3) uint8 array.
        """
        validate_items(items)
        jobs: list[tuple[int, Any]] = []
        results: list[JudgeResult | None] = [None] * len(items)
        for i, item in enumerate(items):
            queries = queries_for(item, self.mode, self.prompts)
            if isinstance(queries, JudgeResult):
                results[i] = queries
                continue
            url = png_data_url(item.image)
            jobs.extend((i, self._pool.submit(self._ask, url, q)) for q in queries)
        answers: dict[int, list[Any]] = {}
        for i, fut in jobs:
            answers.setdefault(i, []).append(fut.result())
        for i, outs in answers.items():
            failed = next((o for o in outs if isinstance(o, RemoteError)), None)
            if failed is not None:
                results[i] = error_result(str(failed))
            elif self.mode == "checklist":
                results[i] = result_from_checklist(outs[0][0], asked_checklist(items[i]))
            elif self.mode == "questions":
                results[i] = result_from_answers([o[0] for o in outs], expected_answers(items[i]))
            else:
                text, top = outs[0]
                results[i] = result_from_token_logprobs(top, raw=text, threshold=self._yes_threshold)
        return [r if r is not None else error_result("no output") for r in results]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _ask(self, image_url: str, text: str) -> tuple[str, dict[str, float]] | RemoteError:
        """(answer text, first-token top log-probs) or a RemoteError after retries."""
        body = self._request_body(image_url, text)
        last = "no attempt"
        deadline = time.monotonic() + self._timeout_s * (self._max_retries + 1)  # all attempts, back-off included
        attempts = 0
        for attempt in range(self._max_retries + 1):
            if attempt:
                time.sleep(min(self._backoff_s * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic() - 0.05)))
            remaining = min(self._timeout_s, deadline - time.monotonic())
            if remaining < 0.05:  # no time left for another request
                break
            attempts += 1
            try:
                return _parse_reply(self._post(body, remaining))
            except _Retryable as e:
                last = str(e)
                log.warning("remote judge attempt %d/%d failed: %s", attempt + 1, self._max_retries + 1, last)
            except RemoteError as e:
                return e
        return RemoteError(f"{last} (after {attempts} attempts)")

    def _request_body(self, image_url: str, text: str) -> bytes:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0.0,
            "max_tokens": {"checklist": self._max_tokens, "questions": self._answer_max_tokens}.get(
                self.mode, 1
            ),
        }
        if self.mode == "vqascore":
            body.update(logprobs=True, top_logprobs=self._top_logprobs)
        return json.dumps(body).encode()

    def _post(self, body: bytes, timeout_s: float) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self._api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self._api_key_env, '')}"
        req = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = f"http {e.code}: {e.read()[:200].decode(errors='replace')}"
            if e.code in _RETRY_STATUS:
                raise _Retryable(detail) from e
            raise RemoteError(detail) from e
        except TimeoutError as e:
            raise _Retryable(f"timeout after {timeout_s:.3g}s") from e
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError | socket.timeout):
                raise _Retryable(f"timeout after {timeout_s:.3g}s") from e
            raise _Retryable(f"connection error: {reason}") from e


class _Retryable(Exception):
    pass


def _parse_reply(raw: bytes) -> tuple[str, dict[str, float]]:
    """Chat-completions JSON -> (content text, first token's top log-probs as token -> logprob)."""
    try:
        reply = json.loads(raw)
        choice = reply["choices"][0]
        content = choice["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise RemoteError(f"bad response ({type(e).__name__}): {raw[:200]!r}") from e
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    top: dict[str, float] = {}
    try:
        first = (choice.get("logprobs") or {}).get("content") or []
        for entry in first[0].get("top_logprobs", []) if first else []:
            top[str(entry["token"])] = float(entry["logprob"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise RemoteError(f"bad logprobs in response ({type(e).__name__})") from e
    return str(content), top
