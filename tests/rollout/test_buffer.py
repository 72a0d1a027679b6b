"""Rollout buffer: bounded perfect/imperfect splits, p_perfect sampling, JSON checkpoint.

Design: docs/design.md#rollout-buffer.
"""

import json

import numpy as np
import pytest

from rollout.buffer import BufferEntry, RolloutBuffer


def _e(i, score):
    return BufferEntry(f"p{i}", np.full((4, 4, 3), i, np.uint8), score, score >= 1, {"tag": "t"}, step=i)


def test_split_and_bounded_fifo():
    buf = RolloutBuffer(capacity=3)
    buf.extend([_e(i, 1.0 if i % 2 else 0.2) for i in range(10)])
    assert (buf.num_perfect, buf.num_imperfect, len(buf)) == (3, 3, 6)
    # oldest evicted: the perfect split holds the last three odd entries
    assert {e.prompt for e in buf.sample(200) if e.score == 1.0} == {"p5", "p7", "p9"}


def test_p_perfect_rule_frequency():
    buf = RolloutBuffer(capacity=50, p_perfect=0.15, seed=1)
    buf.extend([_e(i, 1.0) for i in range(5)] + [_e(i, 0.0) for i in range(5, 10)])
    draws = buf.sample(4000)
    frac = sum(e.score == 1.0 for e in draws) / len(draws)
    assert 0.12 < frac < 0.18
    assert buf.fallbacks == 0


def test_empty_split_falls_back_and_empty_buffer_raises():
    buf = RolloutBuffer(p_perfect=1.0)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
    buf.add(_e(0, 0.5))
    assert buf.sample(3)[0].prompt == "p0"
    assert buf.fallbacks == 3


def test_same_seed_same_draws():
    a, b = RolloutBuffer(seed=5), RolloutBuffer(seed=5)
    for buf in (a, b):
        buf.extend([_e(i, i / 10) for i in range(11)])
    assert [e.prompt for e in a.sample(20)] == [e.prompt for e in b.sample(20)]


def test_state_dict_is_json_and_resumes_exactly():
    buf = RolloutBuffer(capacity=4, p_perfect=0.5, seed=2)
    buf.extend([_e(i, 1.0 if i < 3 else 0.3) for i in range(8)])
    buf.sample(5)
    state = json.loads(json.dumps(buf.state_dict()))
    expected = buf.sample(10)
    other = RolloutBuffer(capacity=1, seed=99)
    other.load_state_dict(state)
    got = other.sample(10)
    assert [e.prompt for e in got] == [e.prompt for e in expected]
    for x, y in zip(got, expected, strict=True):
        assert np.array_equal(x.image, y.image) and x.image.dtype == np.uint8
        assert (x.score, x.correct, x.metadata, x.step) == (y.score, y.correct, y.metadata, y.step)
    assert (other.capacity, other.num_perfect, other.num_imperfect) == (4, 3, 4)


@pytest.mark.parametrize("kwargs", [dict(capacity=0), dict(p_perfect=1.5), dict(perfect_score=0.0)])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        RolloutBuffer(**kwargs)


def test_bad_entries_raise():
    buf = RolloutBuffer()
    with pytest.raises(ValueError, match="uint8"):
        buf.add(BufferEntry("p", np.zeros((4, 4, 3), np.float32), 0.5))
    with pytest.raises(ValueError, match="score"):
        buf.add(BufferEntry("p", np.zeros((4, 4, 3), np.uint8), 1.5))
