"""`python -m cluster.export RUN_OR_CHECKPOINT OUT`: trained models as folders the stock loaders read.

Shows: from a run folder whose checkpoint holds LoRA adapters (written by `LoraAdapters.save_adapters`,
as the learners do), the export writes a reasoner folder that `AutoModelForImageTextToText` loads
with exactly the merged weights (and the adapted model's logits), and a generator folder that
`FluxKontextPipeline.from_pretrained` loads whole and samples from, with the merged transformer; a
checkpoint of full weights exports them as they are, and the generic `DiffusionPipeline` /
`AutoProcessor` loaders read the folders too (a one-step edit runs); a missing folder, a folder
without a checkpoint, a base model that is not a local folder, and an output folder that
is not empty, are refused with exit 2 naming the path and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
VLM_LORA = dict(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
FLUX_LORA = dict(rank=4, alpha=8.0, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def write_run(root: Path, overrides: list[str], step: int = 3) -> tuple[Path, Path]:
    """A run folder with `config.yaml` and one complete, empty checkpoint (learner folders added by the caller)."""
    from cluster.checkpoint import COMPLETE
    from cluster.config import load_config

    run = root / "run"
    ck = run / "checkpoints" / f"step-{step:06d}"
    ck.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(load_config(None, overrides).model_dump(mode="json")))
    (ck / "meta.json").write_text(json.dumps({"step": step}))
    (ck / COMPLETE).write_text("ok\n")
    return run, ck


def adapted(model: torch.nn.Module, settings: dict, seed: int):
    """`model` with adapters whose B is random (so they change it), as after training."""
    from learners.lora import LoraAdapters

    torch.manual_seed(seed)
    lora = LoraAdapters.apply(model, **settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    return lora


def run_export(source: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cluster.export", str(source), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_refuses_a_folder_without_checkpoint_and_a_used_output(tmp_path):
    from cluster.export import main

    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    run, _ = write_run(tmp_path, [])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    assert main([str(run), str(tmp_path / "used")]) == 2


def test_refusals_name_the_problem(tmp_path):
    from cluster.export import ExportRefused, export, resolve_checkpoint

    with pytest.raises(ExportRefused, match=f"{tmp_path}/nowhere does not exist or is not a folder"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"png")
    with pytest.raises(ExportRefused, match=f"{tmp_path}/photos is neither a complete checkpoint folder nor a run"):
        resolve_checkpoint(tmp_path / "photos")
    run, ck = write_run(tmp_path, [])
    assert resolve_checkpoint(run) == ck
    with pytest.raises(ExportRefused, match="text_learner/weights is missing"):
        export(run, tmp_path / "out")


def test_main_prints_the_refusal_with_the_path(tmp_path, capsys):
    from cluster.export import main

    assert main([str(tmp_path / "photos"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export refused: ") and str(tmp_path / "photos") in err
    assert not (tmp_path / "out").exists()


def test_base_neither_folder_nor_cached_is_refused(tmp_path):
    from cluster.export import ExportRefused, _base_folder

    assert _base_folder(str(tmp_path), "reasoner") == tmp_path
    with pytest.raises(ExportRefused, match="generator base 'someone/not-downloaded' .*models.generator.path"):
        _base_folder("someone/not-downloaded", "generator")
    with pytest.raises(ExportRefused, match=f"reasoner base '{tmp_path}/gone'"):
        _base_folder(str(tmp_path / "gone"), "reasoner")


@pytest.mark.integration
def test_lora_run_exports_merged_reasoner_and_full_pipeline(tiny_models, tmp_path):
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run, ck = write_run(tmp_path, ["grpo.lora.rank=4", "flow_grpo.lora.rank=4"])
    reasoner = AutoModelForImageTextToText.from_pretrained(str(tiny_models.vlm), dtype=torch.float32).eval()
    text_lora = adapted(reasoner, VLM_LORA, seed=1)
    text_lora.save_adapters(reasoner, ck / "text_learner" / "weights", 0, str(tiny_models.vlm))
    transformer = FluxTransformer2DModel.from_pretrained(str(tiny_models.flux), subfolder="transformer").eval()
    image_lora = adapted(transformer, FLUX_LORA, seed=2)
    image_lora.save_adapters(transformer, ck / "diffusion_learner" / "weights", 0, str(tiny_models.flux))

    result = run_export(run, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "with LoRA merged" in result.stdout

    loaded = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out" / "reasoner"), dtype=torch.float32).eval()
    merged = text_lora.merged_state_dict(reasoner)
    got = dict(loaded.named_parameters())
    assert set(got) == set(merged)
    for name, want in merged.items():
        assert torch.equal(got[name].detach(), want), name
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reasoner(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "out" / "reasoner" / "tokenizer.json").is_file()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "out" / "reasoner"))
    assert processor.tokenizer("a red ball").input_ids

    pipe = FluxKontextPipeline.from_pretrained(str(tmp_path / "out" / "generator"), dtype=torch.float32)
    merged_t = image_lora.merged_state_dict(transformer)
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p.detach(), merged_t[name]), name
    base = FluxKontextPipeline.from_pretrained(str(tiny_models.flux), dtype=torch.float32)
    assert sum(float((p - q).detach().abs().sum()) for p, q in zip(pipe.transformer.parameters(),
                                                           base.transformer.parameters(), strict=True)) > 1e-3
    for component in ("vae", "text_encoder", "text_encoder_2"):  # the rest of the pipeline is the base's
        for p, q in zip(getattr(pipe, component).parameters(), getattr(base, component).parameters(), strict=True):
            assert torch.equal(p, q)
    image = pipe(prompt="a red ball", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                 max_sequence_length=32, max_area=32 * 32, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert summary["step"] == 3 and summary["reasoner"]["lora"]["rank"] == 4 and summary["generator"]["lora"]


@pytest.mark.integration
def test_full_weight_checkpoint_exports_its_weights(tiny_models, tmp_path, perturb_weights):
    from diffusers import DiffusionPipeline, FluxKontextPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, ck = write_run(tmp_path, ["models.reasoner.path=tiny:lm"])
    perturb_weights(tiny_models.lm, ck / "text_learner" / "weights", seed=3)
    perturb_weights(tiny_models.flux / "transformer", ck / "diffusion_learner" / "weights", seed=4)

    result = run_export(ck, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    saved = AutoModelForCausalLM.from_pretrained(str(ck / "text_learner" / "weights"), dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "reasoner"), dtype=torch.float32)
    for (name, p), q in zip(saved.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(p, q), name
    pipe = FluxKontextPipeline.from_pretrained(str(tmp_path / "out" / "generator"), dtype=torch.float32)
    from safetensors.torch import load_file

    want = load_file(str(next((ck / "diffusion_learner" / "weights").glob("*.safetensors"))))
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p.detach(), want[name]), name
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out" / "reasoner"))("a red ball").input_ids

    generic = DiffusionPipeline.from_pretrained(str(tmp_path / "out" / "generator"), dtype=torch.float32)
    assert type(generic) is FluxKontextPipeline
    for (name, p), q in zip(generic.transformer.named_parameters(), pipe.transformer.parameters(), strict=True):
        assert torch.equal(p, q), name
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # edited, as in reflect
    edited = generic(image=image, prompt="make the ball blue", height=32, width=32, num_inference_steps=1,
                     guidance_scale=3.5, max_sequence_length=32, max_area=32 * 32,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert edited.shape == (32, 32, 3) and bool((edited >= 0).all() and (edited <= 1).all())
