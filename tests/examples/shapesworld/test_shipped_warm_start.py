"""The warm start that ships in examples/shapesworld/warmstart is complete, intact and small: every
model file is listed in its manifest with the right sha256, nothing unlisted is there, it fits in
10 MB, and the manifest says how it was built and what it measured."""

import hashlib
import json
from pathlib import Path

import pytest

from examples.shapesworld.models import WARM_START

MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def manifest() -> dict:
    path = WARM_START / "manifest.json"
    assert path.is_file(), f"{path} is missing: the demo needs the shipped warm start (make warmstart builds it)"
    return json.loads(path.read_text())


def test_every_model_file_is_listed_with_its_sha256(manifest):
    on_disk = {p.relative_to(WARM_START).as_posix(): p for part in ("flux", "vlm")
               for p in sorted((WARM_START / part).rglob("*")) if p.is_file()}
    assert set(manifest["files"]) == set(on_disk)
    for name, path in on_disk.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["files"][name], name


def test_it_fits_in_ten_megabytes_and_stores_weights_in_half_precision(manifest):
    files = [p for p in WARM_START.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    assert manifest["settings"]["storage_dtype"] == "float16"
    assert any(p.suffix == ".safetensors" for p in files)


def test_the_manifest_says_how_it_was_built_and_what_it_measured(manifest):
    assert manifest["command"].startswith("python -m examples.shapesworld.pretrain")
    assert manifest["seed"] == 0
    gen, reasoner = manifest["generator_eval"], manifest["reasoner_eval"]
    assert 0.0 <= gen["t2i_accuracy"] <= 1.0 and 0.0 <= gen["edit_accuracy"] <= 1.0 and gen["n"] > 0
    assert 0.0 <= reasoner["reflect_stop_accuracy"] <= 1.0 and reasoner["n"] > 0
    own = manifest["reasoner_own_images"]  # the reasoner's stage on the generator's own images
    assert own["train_images"] > 0 and "skipped" not in own
    assert own["after"]["n_correct"] + own["after"]["n_wrong"] == own["eval_images"] > 0
    assert manifest["times"]["total_s"] > 0


def test_the_plugin_names_resolve_to_the_shipped_folders():
    from actors.named_models import named_model_path

    assert named_model_path("shapes-flux") == WARM_START / "flux"
    assert named_model_path("shapes-vlm") == WARM_START / "vlm"
    assert Path(WARM_START / "flux" / "model_index.json").is_file()
