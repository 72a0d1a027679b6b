"""Tiny offline models: deterministic, atomic cached builds, and each loads with its serving library."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from actors import models
from actors.models import TINY_VERSION, TinyModels, build_tiny_lm, build_tiny_models


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_lm_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = build_tiny_lm(tmp_path / "a", seed=0)
    b = build_tiny_lm(tmp_path / "b", seed=0)
    c = build_tiny_lm(tmp_path / "c", seed=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_cached_build_reuses_and_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_builder(out: Path, seed: int) -> Path:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"x")
        return out

    def failing_builder(out: Path, seed: int) -> Path:
        out.mkdir(parents=True)
        (out / "partial").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    final = tmp_path / "tiny" / "lm"
    assert models._build_once(final, fake_builder, force=False) == final
    assert models._build_once(final, fake_builder, force=False) == final
    assert len(calls) == 1, "second call must reuse the finished folder"
    models._build_once(final, fake_builder, force=True)
    assert len(calls) == 2

    other = tmp_path / "tiny" / "vlm"
    with pytest.raises(RuntimeError, match="killed"):
        models._build_once(other, failing_builder, force=False)
    assert not other.exists()
    assert sorted(p.name for p in other.parent.iterdir()) == ["lm"], "temp folders must be removed"


def test_build_tiny_models_layout_and_cli(tmp_path: Path) -> None:
    assert models.main(["build-tiny", "--out", str(tmp_path)]) == 0
    built = build_tiny_models(tmp_path)
    assert isinstance(built, TinyModels)
    for name, folder in built._asdict().items():
        assert folder == tmp_path / TINY_VERSION / name
    assert (built.lm / "tokenizer.json").is_file() and (built.lm / "chat_template.jinja").is_file()
    assert (built.vlm / "processor_config.json").is_file()
    assert (built.flux / "model_index.json").is_file()


def test_cache_dir_follows_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("R3RL_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("R3RL_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "r3rl"


# ---------------------------------------------------------------- loading with the serving library


@pytest.mark.integration
def test_lm_forward_with_transformers(tiny_models: TinyModels) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models.lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.lm, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "a red circle"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.integration
def test_vlm_forward_with_transformers(tiny_models: TinyModels, make_image) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_models.vlm)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models.vlm, dtype=torch.float32)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}],
        add_generation_prompt=True)
    enc = proc(text=[text], images=[[Image.fromarray(make_image(0))]], return_tensors="pt")
    # 84x84 -> 2x2 tiles of 56 px + 1 global image, 4 tokens each.
    assert int((enc["input_ids"] == proc.image_token_id).sum()) == 20
    logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.integration
def test_lm_and_vlm_generate_with_vllm(text_worker_lm, text_worker_vlm, make_image) -> None:
    from PIL import Image
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0)
    out = text_worker_lm.llm.generate(["a photo of"], params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 1
    prompt = "<|im_start|>User:<image> Is it red?<end_of_utterance>\nAssistant:"
    image = Image.fromarray(make_image(1))
    out = text_worker_vlm.llm.generate(
        [{"prompt": prompt, "multi_modal_data": {"image": image}}], params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 1
    assert out.prompt_token_ids.count(text_worker_vlm._renderer.image_token_id) == 20


@pytest.mark.integration
def test_flux_loads_with_diffusers_and_generates_and_edits(tiny_models: TinyModels, make_image) -> None:
    from diffusers import FluxKontextPipeline
    from PIL import Image

    pipe = FluxKontextPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)
    common = dict(height=64, width=64, max_area=64 * 64, _auto_resize=False, num_inference_steps=2,
                  guidance_scale=3.5, output_type="np")
    gen = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **common).images
    edit = pipe(prompt="make it blue", image=Image.fromarray(make_image(2, 64, 64)),
                generator=torch.Generator().manual_seed(0), **common).images
    assert gen.shape == edit.shape == (1, 64, 64, 3)
    assert not torch.allclose(torch.from_numpy(gen), torch.from_numpy(edit))
