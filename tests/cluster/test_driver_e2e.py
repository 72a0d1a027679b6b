"""End to end on a local Ray cluster with tiny models: every role really runs.

One Trainer (2 text workers, 2 diffusion workers, a VLM judge on Serve, GRPO and FlowGRPO learners on
DeepSpeed, bucketed weight sync) runs 2 tree-mode steps, then 2 chain-mode steps, then a short
multi-round evaluation.
"""

import json
import math
from dataclasses import replace

import pytest

from cluster.config import load_config
from cluster.driver import Trainer, make_run_dir

pytestmark = pytest.mark.integration

REQUIRED = [
    "text_learner/loss", "text_learner/kl", "text_learner/clip_frac_high", "text_learner/grad_norm",
    "diffusion_learner/loss", "diffusion_learner/grad_norm", "time/rollout", "time/learn", "time/sync",
    "sync/text_seconds", "sync/image_bytes", "version/policy",
]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, free_port):
    import ray

    run_root = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/cpu_tiny.yaml", [f"cluster.metrics_export_port={free_port()}",
        "cluster.text_workers=2", "cluster.diffusion_workers=2", f"train.run_dir={run_root}", "train.run_name=e2e",
        "r3.group_size=4", "r3.prompts_per_step=2", "r3.max_rounds=2", "data.eval_limit=4", "train.eval_rounds=2",
        "logging.progress=false",
    ])
    from cluster.session import connect_ray

    assert connect_ray(cfg)  # a local cluster with the engine environment, as `python -m cluster.train` does
    t = Trainer(cfg, make_run_dir(cfg))
    yield t
    t.close()
    ray.shutdown()


def _finite_numbers(row):
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def test_tree_then_chain_steps_run_every_role(trainer):
    rows = [trainer.step(), trainer.step()]
    assert [r["stages"] for r in rows] == ["generate", "refine"]
    trainer.settings = replace(trainer.settings, mode="chain")
    rows += [trainer.step(), trainer.step()]
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"step {i}: missing {missing}"
        bad = {k: v for k, v in _finite_numbers(row).items() if not math.isfinite(v)}
        assert not bad, f"step {i}: non-finite {bad}"
        # weight versions advance by one per step on every worker
        assert row["version/policy"] == i + 1
        assert row["version/text_workers_min"] == i + 1 and row["version/diffusion_workers_min"] == i + 1
    assert "generate/score_mean" in rows[0] and "refine/score_mean" in rows[1]
    assert rows[2]["samples/trajectories"] == 2 * 4  # chain: prompts x group trajectories
    # requests of one step reached both workers of each role
    assert all(c > 0 for c in trainer.roles.text_pool.calls_per_worker)
    assert all(c > 0 for c in trainer.roles.diffusion_pool.calls_per_worker)
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3]
    assert (trainer.run_dir / "trajectories" / "step-000000.parquet").is_file()
    assert any((trainer.run_dir / "tensorboard").iterdir())


def test_multi_round_evaluation_writes_tables(trainer):
    report = trainer.evaluate(tag="test")
    out = trainer.run_dir / "eval-test"
    data = json.loads((out / "eval.json").read_text())
    assert data["num_prompts"] == 4 and len(data["overall"]) == 2
    assert "| overall | 0 |" in (out / "eval.md").read_text()
    assert (out / "gallery.html").read_text().count("data:image/png;base64,") >= 4
    assert len(report.trajectories) == 4


def test_metrics_reach_prometheus_with_role_and_worker_tags(trainer):
    """The node's Prometheus endpoint serves the driver's per-role and per-worker gauges."""
    import time
    import urllib.request

    port = trainer.cfg.cluster.metrics_export_port
    wanted = ["r3rl_time_rollout", "r3rl_text_learner_loss", 'r3rl_worker_images_per_s', 'worker="diffusion-worker-1"',
              "r3rl_worker_weight_version", 'worker="text-worker-0"']
    body = ""
    for _ in range(60):  # Ray exports metrics every few seconds
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if all(w in body for w in wanted):
            break
        time.sleep(1)
    missing = [w for w in wanted if w not in body]
    assert not missing, missing
