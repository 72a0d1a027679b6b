"""`actors.named_models`: the registry behind `tiny:<name>` model paths."""

from pathlib import Path

import pytest

import actors.named_models as named_models
from actors.named_models import known_named_models, named_model_path, register_named_model


@pytest.fixture
def registry(monkeypatch):
    """The real registry's entries in a copy that the test may change."""
    monkeypatch.setattr(named_models, "_REGISTRY", dict(named_models._REGISTRY))


def test_builtins_are_the_tiny_models():
    assert {"lm", "vlm", "flux"} <= set(known_named_models())


def test_registered_name_resolves_to_its_folder(registry, tmp_path):
    @register_named_model("mine")
    def _mine() -> Path:
        return tmp_path / "mine"

    assert "mine" in known_named_models() and named_model_path("mine") == tmp_path / "mine"


def test_duplicate_name_raises(registry):
    with pytest.raises(ValueError, match=r"named model 'vlm' is already registered; known: \[.*'flux'.*\]"):
        register_named_model("vlm")(lambda: Path("."))


def test_unknown_name_lists_the_known_ones_and_the_plugins_key(registry):
    with pytest.raises(ValueError, match="config key plugins") as err:
        named_model_path("gpt5")
    assert str(err.value).startswith(f"unknown named model 'gpt5' (a model path 'tiny:gpt5'); known: {known_named_models()}")


def test_a_registration_that_cannot_provide_its_model_says_why(registry):
    @register_named_model("unbuilt")
    def _unbuilt() -> Path:
        raise ValueError("build it first")

    with pytest.raises(ValueError, match="build it first"):
        named_model_path("unbuilt")
