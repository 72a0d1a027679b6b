"""Export a run's trained models as folders the stock loaders read: `python -m cluster.export RUN_OR_CHECKPOINT OUT`.

RUN_OR_CHECKPOINT is a checkpoint folder (`<run>/checkpoints/step-N`, complete) or a run folder
(its newest complete checkpoint). OUT gets:
- `reasoner/`: a transformers model folder (config, safetensors, tokenizer / processor files) that
  `AutoModelForCausalLM` / `AutoModelForImageTextToText.from_pretrained` loads (and `AutoProcessor` /
  `AutoTokenizer`);
- `generator/`: a full diffusers `FluxKontextPipeline` folder (the base pipeline's text encoders,
  VAE, scheduler and tokenizers, with the trained transformer) for `FluxKontextPipeline` /
  `DiffusionPipeline.from_pretrained`;
- `export.json`: where it came from (checkpoint, step, LoRA settings).
A learner that trained LoRA adapters (`grpo.lora`, `flow_grpo.lora`) saved only them: they are merged
into the base named by the run's `config.yaml` (W + alpha/r·B·A, `learners.lora.merge_into_state`).
A base is a local model folder (nothing is downloaded or looked up in a hub cache).
Exit codes: 0 written, 2 refused (no checkpoint, unreadable config, base not found, OUT not empty).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["export", "resolve_checkpoint", "main"]


class ExportRefused(ValueError):
    """The export cannot start; the message says why and what to give instead."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder, or the newest complete one of a run folder."""
    from cluster.checkpoint import COMPLETE, checkpoints_dir, find_latest

    path = Path(path)
    if not path.is_dir():
        raise ExportRefused(f"{path} does not exist or is not a folder; name a run folder or one of its "
                            "checkpoints (<run>/checkpoints/step-N)")
    if (path / COMPLETE).is_file():
        return path
    latest = find_latest(checkpoints_dir(path))
    if latest is None:
        raise ExportRefused(f"{path} is neither a complete checkpoint folder nor a run folder with one "
                            "(<run>/checkpoints/step-N with a COMPLETE marker); save a checkpoint first "
                            "(checkpoint.every) or name another folder")
    return latest


def export(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Write `out/reasoner`, `out/generator` and `out/export.json` from a checkpoint or run; returns the summary."""
    from cluster.checkpoint import run_dir_of
    from cluster.config import ConfigError, load_config
    from cluster.session import resolve_model_path

    checkpoint = resolve_checkpoint(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportRefused(f"output folder {out} is not empty; give a new or empty folder")
    config_file = run_dir_of(checkpoint) / "config.yaml"
    if not config_file.is_file():
        raise ExportRefused(f"{config_file} is missing: the export reads the run's model paths from it")
    try:
        cfg = load_config(config_file)
    except ConfigError as e:
        raise ExportRefused(f"{config_file}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "checkpoint": str(checkpoint.resolve()),
        "step": json.loads((checkpoint / "meta.json").read_text()).get("step"),
        "reasoner": export_reasoner(checkpoint / "text_learner" / "weights",
                                    resolve_model_path(cfg.models.reasoner.path), out / "reasoner"),
        "generator": export_generator(checkpoint / "diffusion_learner" / "weights",
                                      resolve_model_path(cfg.models.generator.path), out / "generator"),
    }
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary


def export_reasoner(weights: Path, base: str, out: Path) -> dict[str, Any]:
    """The reasoner as a transformers folder: the learner's saved weights, or the base with its adapters merged."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    _require_weights(weights)
    base = str(_base_folder(base, "reasoner"))
    vlm = getattr(AutoConfig.from_pretrained(base), "vision_config", None) is not None
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    lora = _lora_settings(weights)
    model = cls.from_pretrained(base if lora else str(weights), dtype="auto")
    if lora:
        _merge_adapters(model, weights, lora)
    model.save_pretrained(str(out), safe_serialization=True)
    _copy_side_files(Path(base), out)
    return {"class": type(model).__name__, "lora": lora, "vlm": vlm,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def export_generator(weights: Path, base: str, out: Path) -> dict[str, Any]:
    """The generator as a full pipeline folder: the base pipeline's components with the trained transformer."""
    from diffusers import FluxTransformer2DModel

    _require_weights(weights)
    base_dir = _base_folder(base, "generator")
    if not (base_dir / "model_index.json").is_file():
        raise ExportRefused(f"generator base {base} is not a diffusers pipeline folder (no model_index.json): "
                            "the export needs its text encoders, VAE and scheduler")
    shutil.copytree(base_dir, out, ignore=shutil.ignore_patterns("transformer"))
    lora = _lora_settings(weights)
    source = base_dir / "transformer" if lora else weights
    transformer = FluxTransformer2DModel.from_pretrained(str(source))
    if lora:
        _merge_adapters(transformer, weights, lora)
    transformer.save_pretrained(str(out / "transformer"), safe_serialization=True)
    return {"class": "FluxKontextPipeline", "lora": lora,
            "transformer_parameters": int(sum(p.numel() for p in transformer.parameters()))}


def _require_weights(weights: Path) -> None:
    if not weights.is_dir():
        raise ExportRefused(f"{weights} is missing: the checkpoint holds no weights of this learner")


def _base_folder(base: str, role: str) -> Path:
    """The local folder of a base model (`models.<role>.path` after `resolve_model_path`): nothing is
    fetched or looked up in a hub cache, so an export reads exactly the files the run trained from."""
    path = Path(base)
    if path.is_dir():
        return path
    raise ExportRefused(f"{role} base {base!r} (models.{role}.path of the run's config.yaml) is not a local "
                        "folder; export on the machine that trained, or give the run's config a local model folder")


def _lora_settings(weights: Path) -> dict[str, Any] | None:
    from learners.lora import is_adapter_folder, read_lora_config

    return read_lora_config(weights) if is_adapter_folder(weights) else None


def _merge_adapters(model: Any, weights: Path, lora: dict[str, Any]) -> None:
    """Fold the adapter file of `weights` into `model`'s layers in place."""
    import torch
    from safetensors.torch import load_file

    from learners.lora import LORA_WEIGHTS, lora_scale, merge_into_state

    adapters = load_file(str(weights / LORA_WEIGHTS))
    base = {k: v for k, v in model.state_dict().items()}
    merged = merge_into_state(base, adapters, lora_scale(int(lora["rank"]), float(lora["alpha"])))
    with torch.no_grad():
        model.load_state_dict(merged, strict=True)


def _copy_side_files(base: Path, out: Path) -> None:
    """Tokenizer / processor / chat-template files of the base, so the folder loads on its own."""
    for f in base.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin") and not f.name.endswith(".index.json") \
                and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a checkpoint folder (<run>/checkpoints/step-N) or a run folder (its newest)")
    ap.add_argument("out", help="new or empty folder for reasoner/, generator/ and export.json")
    args = ap.parse_args(argv)
    try:
        summary = export(args.source, args.out)
    except ExportRefused as e:
        print(f"export refused: {e}", file=sys.stderr)
        return 2
    print(f"exported step {summary['step']} of {summary['checkpoint']} to {args.out}: reasoner/ "
          f"({summary['reasoner']['class']}), generator/ (FluxKontextPipeline)"
          + (" with LoRA merged" if summary["reasoner"]["lora"] or summary["generator"]["lora"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
