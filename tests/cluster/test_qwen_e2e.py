"""End to end with the Qwen2.5-VL family as the reasoner, served by the transformers backend.

The tiny random Qwen2.5-VL (`tiny:qwen25vl`) plans and reflects on images in a `HFTextWorker`
(`models.reasoner.backend: hf`), GRPO trains it on DeepSpeed, the bucketed broadcast syncs it back
into the worker, the tiny generator draws and the tiny VLM judge scores on Serve: two tree steps
(generate, then refine with the image in the prompt), then a two-round evaluation.
"""

import json
import math
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.driver import Trainer, make_run_dir


def test_hf_backend_is_refused_with_tensor_parallel_workers():
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match="backend=hf runs each text worker on one device"):
        load_config("configs/cpu_tiny.yaml", ["models.reasoner.backend=hf",
                                               "cluster.text_workers.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="backend"):
        load_config("configs/cpu_tiny.yaml", ["models.reasoner.backend=sglang"])


def test_the_backend_picks_the_text_worker_class():
    from actors.hf_text_worker import HFTextWorker
    from actors.text_worker import TextWorker
    from cluster.roles import text_worker_class

    assert text_worker_class("hf") is HFTextWorker and text_worker_class("vllm") is TextWorker
    assert load_config("configs/cpu_tiny.yaml").models.reasoner.backend == "vllm"


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, free_port):
    import ray

    run_root = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/cpu_tiny.yaml", [
        "models.reasoner.path=tiny:qwen25vl", "models.reasoner.backend=hf", "models.reasoner.max_model_len=512",
        f"cluster.metrics_export_port={free_port()}", f"train.run_dir={run_root}", "train.run_name=qwen-e2e",
        "r3.group_size=4", "r3.prompts_per_step=2", "r3.max_rounds=2", "data.eval_limit=2", "train.eval_rounds=2",
        "grpo.max_tokens=16", "grpo.lr=1e-3", "logging.progress=false",
    ])
    from cluster.session import connect_ray

    assert connect_ray(cfg)
    t = Trainer(cfg, make_run_dir(cfg))
    yield t
    t.close()
    ray.shutdown()


@pytest.mark.integration
def test_two_tree_steps_train_and_sync_the_hf_reasoner(trainer, tmp_path, perturb_weights):
    import ray

    worker = trainer.roles.text_pool.actors[0]
    assert ray.get(worker.health.remote())["backend"] == "hf"
    # Random answers are never well formed, so the reasoner's rewards (and its update) are 0 here; to see
    # the sync land, the worker first loads noisy weights, which the step's broadcast must overwrite.
    noisy = perturb_weights(Path(trainer.paths.reasoner), tmp_path / "noisy")
    assert ray.get(worker.load_weights.remote(0, str(noisy))) == 0
    learner = trainer.roles.text_learners.call_rank0("state_dict_checksum")
    assert abs(ray.get(worker.weights_checksum.remote()) - learner) > 1e-3
    rows = [trainer.step(), trainer.step()]
    assert [r["stages"] for r in rows] == ["generate", "refine"]
    for i, row in enumerate(rows):
        assert row["version/policy"] == i + 1 and row["version/text_workers_min"] == i + 1
        for key in ("text_learner/loss", "text_learner/grad_norm", "sync/text_seconds"):
            assert math.isfinite(row[key]), (i, key, row[key])
        assert row["text_learner/num_tokens"] > 0
    # step 0 sampled with the noisy weights: the learner's replay disagrees; after the sync the worker holds
    # the learner's weights, so step 1 (the refine stage, images in the prompts) replays to ratio 1
    assert max(abs(rows[0]["text_learner/ratio_min"] - 1), abs(rows[0]["text_learner/ratio_max"] - 1)) > 1e-2
    assert rows[1]["text_learner/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert rows[1]["text_learner/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    learner = trainer.roles.text_learners.call_rank0("state_dict_checksum")
    assert ray.get(worker.weights_checksum.remote()) == pytest.approx(learner, rel=1e-9)


@pytest.mark.integration
def test_multi_round_evaluation_with_the_hf_reasoner(trainer):
    report = trainer.evaluate(tag="qwen")
    data = json.loads((trainer.run_dir / "eval-qwen" / "eval.json").read_text())
    assert data["num_prompts"] == 2 and len(data["overall"]) == 2
    assert len(report.trajectories) == 2
