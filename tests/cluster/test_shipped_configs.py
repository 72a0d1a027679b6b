"""Every shipped config validates and fits the cluster it declares; one that does not fit exits 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import check_model_paths, load_config
from cluster.fit_check import placement_misfit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("examples/*/configs/*.yaml")])
GPU = str(ROOT / "configs/gpu_kontext_qwenvl.yaml")


def test_the_shipped_configs_are_found():
    names = {p.name for p in SHIPPED}
    assert {"cpu_tiny.yaml", "gpu_kontext_qwenvl.yaml", "shapes_cpu.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_config_validates_and_fits(path):
    from cluster.launch_plan import check_launch

    cfg = load_config(path)
    check_model_paths(cfg, dry_run=True)  # tiny models, or a config folder for models elsewhere
    assert placement_misfit(cfg) is None
    check_launch(cfg)  # placement and memory against cluster.hardware when declared


def test_gpu_config_declares_its_hardware_and_counts_the_judge_at_its_maximum():
    cfg = load_config(GPU)
    hw = cfg.cluster.hardware
    assert (hw.nodes, hw.gpus_per_node, hw.gpu_memory_gb) == (4, 8, 80)
    r = cfg.cluster.judge_replicas
    others = sum(getattr(cfg.cluster, role).count * getattr(cfg.cluster, role).num_gpus
                 for role in ("text_workers", "diffusion_workers", "text_learners", "diffusion_learners"))
    assert others + r.max_replicas * r.num_gpus == hw.nodes * hw.gpus_per_node  # 24 + 2 x 4 = 32
    msg = placement_misfit(load_config(GPU, ["cluster.judge_replicas.max_replicas=3"]))
    assert msg is not None and msg.startswith("cluster.judge_replicas does not fit")
    assert "3 actors at max_replicas" in msg and "asks for 36 GPUs" in msg and "has 32 GPUs" in msg


def test_config_that_does_not_fit_its_cluster_exits_2_naming_the_role():
    out = subprocess.run(
        [sys.executable, "-m", "cluster.train", "--config", GPU, "--dry-run", "cluster.diffusion_learners.count=20"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stdout[-2000:]
    assert "does not fit on cluster.hardware" in out.stderr and "cluster.diffusion_learners" in out.stderr
    assert "asks for 44 GPUs" in out.stderr and "Traceback" not in out.stderr
