"""Step metrics from hand-made stage counts and advantages."""

import math

import pytest

from cluster.step_metrics import batch_metrics, finite_mean


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the std of an inf advantage
def test_batch_metrics_weigh_stages_by_their_samples_and_count_nonfinite_advantages():
    m = {"generate/samples": 3.0, "refine/samples": 1.0, "generate/judge_errors": 1.0, "refine/judge_errors": 0.0,
         "generate/image_zero_var_groups": 2.0, "refine/image_zero_var_groups": 1.0, "refine/stop_rate": 0.5}
    for key, (g, r) in {"score_mean": (0.2, 0.6), "format_rate": (1.0, 0.0), "text_reward_mean": (0.0, 1.0),
                        "image_reward_mean": (0.5, 0.5)}.items():
        m[f"generate/{key}"], m[f"refine/{key}"] = g, r
    out = batch_metrics([1.0, -1.0], [2.0, -1.0, math.inf], m, ["generate", "refine"])
    assert out["score_mean"] == pytest.approx((3 * 0.2 + 0.6) / 4) and out["format_rate"] == pytest.approx(0.75)
    assert out["text_adv/std"] == pytest.approx(1.0) and out["text_batch/size"] == 2.0
    assert out["image_adv/nonfinite"] == 1.0 and out["image_batch/size"] == 3.0 and out["image_zero_var_groups"] == 3.0
    assert out["judge/errors"] == 1.0 and out["stop_rate"] == 0.5  # stop rates of reflect stages only


def test_finite_mean_refuses_a_nonfinite_metric_unless_allowed():
    assert finite_mean([]) == 0.0 and finite_mean([1.0, 2.0]) == 1.5
    assert math.isinf(finite_mean([1.0, math.inf], nonfinite_ok=True))
    with pytest.raises(ValueError, match="non-finite metric"):
        finite_mean([math.nan])
