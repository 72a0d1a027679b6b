"""Scripted fakes of the Reasoner / Generator / Judge protocols for pure-logic R3 tests.

- FakeReasoner: `script(request, sample_index, call_index) -> answer text`; records every call.
- FakeGenerator: draws an (8, 8, 3) image whose first pixels encode a running id, so the judge can
  find the request that made it; records every call and its sampler settings.
- FakeJudge: the score is the number after "s=" in the generator prompt / instruction that made
  the image (0.0 when absent); correct iff score >= 1. Images it did not make raise.
Use `PLAIN` templates so the user message is the bare prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from rollout.interfaces import ImageRequest, JudgeItem, JudgeResult, SamplerSettings, TextRequest
from rollout.templates import Templates
from rollout.trajectory import ImageSample, TextSample

PLAIN = Templates(system="", plan="{prompt}", reflect="{prompt}")


def user_text(req: TextRequest) -> str:
    return req.messages[-1].text


def is_reflect(req: TextRequest) -> bool:
    return bool(req.messages[-1].images)


class FakeReasoner:
    def __init__(self, script: Callable[[TextRequest, int, int], str]) -> None:
        self.script = script
        self.calls: list[list[TextRequest]] = []

    def generate(self, requests: list[TextRequest]) -> list[list[TextSample]]:
        call = len(self.calls)
        self.calls.append(list(requests))
        out = []
        for req in requests:
            group = []
            for i in range(req.n):
                text = self.script(req, i, call)
                ids = list(text.encode()[:16]) or [0]
                group.append(TextSample([len(user_text(req))], ids, [-0.5] * len(ids), text))
            out.append(group)
        return out

    def version(self) -> int:
        return 0


class FakeGenerator:
    def __init__(self) -> None:
        self.made: list[ImageRequest] = []
        self.calls: list[tuple[list[ImageRequest], SamplerSettings]] = []

    def sample(self, requests: list[ImageRequest], settings: SamplerSettings) -> list[ImageSample]:
        self.calls.append((list(requests), settings))
        out = []
        for req in requests:
            idx = len(self.made)
            self.made.append(req)
            img = np.full((8, 8, 3), (req.noise_seed + req.seed) % 251, dtype=np.uint8)
            img[0, 0] = [idx % 256, (idx // 256) % 256, 7]
            img[0, 1] = [idx // 65536, 11, 13]
            out.append(
                ImageSample(
                    image=img,
                    prompt=req.prompt,
                    seed=req.seed,
                    noise_level=settings.noise_level,
                    source_image=req.source_image,
                    log_probs=np.zeros(1, np.float32),
                )
            )
        return out

    def version(self) -> int:
        return 0


def image_id(img: np.ndarray) -> int:
    if tuple(img[0, 0, 2:]) != (7,) or tuple(img[0, 1, 1:]) != (11, 13):
        raise ValueError("not an image of the FakeGenerator")
    return int(img[0, 0, 0]) + 256 * int(img[0, 0, 1]) + 65536 * int(img[0, 1, 0])


def score_of(text: str) -> float:
    m = re.search(r"s=([0-9.]+)", text)
    return float(m.group(1)) if m else 0.0


class FakeJudge:
    def __init__(self, generator: FakeGenerator) -> None:
        self.generator = generator
        self.calls: list[list[JudgeItem]] = []

    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        self.calls.append(list(items))
        out = []
        for it in items:
            req = self.generator.made[image_id(it.image)]
            s = score_of(req.prompt)
            out.append(JudgeResult(s, s >= 1.0, {"made_from": req.prompt}, raw=f"{s}"))
        return out


def fake_image(value: int = 0) -> np.ndarray:
    """An image the judge never sees (buffer starts); distinct by `value`."""
    return np.full((8, 8, 3), value, dtype=np.uint8)
