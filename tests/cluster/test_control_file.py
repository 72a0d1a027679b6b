"""`<run>/control.yaml` as `Trainer.apply_control_file` reads it, on a trainer whose worker pools are
fakes (no Ray cluster): a request the cluster cannot place is refused, the file renamed
`control.rejected-step-K.yaml`, and the pools stay as they were. The real-cluster half (workers
actually added and synced) is `test_elastic_workers_get_current_weights_before_serving` in
test_operations.py."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.config import load_config
from cluster.driver import Trainer

CPU = str(Path(__file__).resolve().parents[2] / "configs/cpu_tiny.yaml")


class FakePool:
    def __init__(self, n: int, reserved: int):
        self.n, self.placement, self.resized = n, SimpleNamespace(bundle_count=reserved), []

    def __len__(self) -> int:
        return self.n

    def resize(self, count: int) -> list[int]:
        self.resized.append(count)
        new, self.n = list(range(self.n, count)), count
        return new


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0, "memory": 1e9})
    t = Trainer.__new__(Trainer)  # only what apply_control_file reads
    t.cfg, t.run_dir, t.step_index = load_config(CPU), tmp_path, 7
    t.console = SimpleNamespace(lines=[])
    t.console.line = t.console.lines.append
    t.roles = SimpleNamespace(text_pool=FakePool(1, 1), diffusion_pool=FakePool(1, 1))
    return t


def test_a_request_beyond_free_resources_is_refused_and_renamed(trainer, caplog):
    (trainer.run_dir / "control.yaml").write_text("text_workers: 4\n")  # 3 more x 0.5 CPU, 1 CPU free
    assert trainer.apply_control_file() == {}
    assert not (trainer.run_dir / "control.yaml").exists()
    assert (trainer.run_dir / "control.rejected-step-000007.yaml").read_text() == "text_workers: 4\n"
    assert trainer.roles.text_pool.resized == [] and len(trainer.roles.text_pool) == 1
    assert "cannot place text_workers: 4 (now 1" in caplog.text and "CPU 1.5 more but 1 free" in caplog.text
    assert trainer.console.lines[0].startswith("control.yaml rejected: cannot place text_workers: 4")
    assert trainer.apply_control_file() == {}  # nothing left to apply: the run goes on


def test_a_request_that_fits_is_applied(trainer):
    (trainer.run_dir / "control.yaml").write_text("text_workers: 3\ndiffusion_workers: 1\n")  # 2 x 0.5 CPU
    assert trainer.apply_control_file() == {"text_workers": [1, 2]}
    assert (trainer.run_dir / "control.applied-step-000007.yaml").is_file()


def test_a_placement_failure_during_the_resize_is_refused_too(trainer, caplog):
    def unplaceable(count):
        raise RuntimeError("placement groups not ready after 600s")

    trainer.roles.diffusion_pool.resize = unplaceable
    (trainer.run_dir / "control.yaml").write_text("diffusion_workers: 2\n")
    assert trainer.apply_control_file() == {}
    assert (trainer.run_dir / "control.rejected-step-000007.yaml").is_file()
    assert "placement groups not ready" in caplog.text
