"""The memory plan of a config: per role and per GPU, what its actors hold, and whether it fits.

`memory_plan(cfg)` reads each model's config files (`cluster.model_shapes`, meta device: no weights
needed), applies `cluster.memory_plan`'s arithmetic to the config's roles, and returns one
`RoleMemory` per role with GPUs; `format_memory_plan` prints them; `check_launch` refuses a config
(`ConfigError`, exit 2) whose placement or memory does not fit its declared `cluster.hardware`.

Where the config files are: the model's `path` when that folder exists here (or a `tiny:<name>`
model), else the folder its `config` key names (`models.reasoner.config`, `models.generator.config`,
`judge.config`; the production models' configs ship in configs/models/).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import memory_plan as mp
from cluster.config import TINY_PREFIX, ConfigError, R3Config
from cluster.fit_check import placement_misfit

__all__ = ["RoleMemory", "memory_plan", "format_memory_plan", "check_launch", "model_config_dir",
           "TEXT_WORKER_GPU_UTILIZATION", "JUDGE_GPU_UTILIZATION"]

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT_WORKER_GPU_UTILIZATION = 0.8  # the default of models.reasoner.gpu_memory_utilization (and of TextWorker)
JUDGE_GPU_UTILIZATION = 0.9  # vLLM's default, which the VLM judge keeps unless judge.gpu_memory_utilization
LM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FLUX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SUGGESTED_LORA_RANK = 64


@dataclass
class RoleMemory:
    """One role's plan on one of its GPUs. total/capacity in bytes (capacity None: hardware not declared)."""

    role: str
    title: str
    parts: dict[str, float]
    notes: list[str] = field(default_factory=list)
    total: float = 0.0
    capacity: float | None = None
    fits: bool | None = None
    problem: str = ""
    fixes: list[str] = field(default_factory=list)


def model_config_dir(section: str, path: str, config: str | None) -> Path:
    """The folder with `section`'s config files: `path` if it is here, else `config` (see the module docstring)."""
    if path.startswith(TINY_PREFIX):
        from cluster.session import resolve_model_path

        return Path(resolve_model_path(path))
    here = Path(os.path.expanduser(path))
    if here.is_dir():
        return here
    if not config:
        raise ConfigError(f"{section}.path: model folder {path!r} is not on this machine; set {section}.config to a "
                          "folder with its config files for the memory plan")
    for candidate in (Path(os.path.expanduser(config)), REPO_ROOT / config):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"{section}.config: folder {config!r} does not exist (looked in the current directory and in "
                      f"{REPO_ROOT})")


def memory_plan(cfg: R3Config) -> list[RoleMemory]:
    """The plan of every role with GPUs (roles without GPUs are not planned)."""
    from cluster.model_shapes import lm_shape, pipeline_shape

    c, hw = cfg.cluster, cfg.cluster.hardware
    gpu = None if hw is None else hw.gpu_memory_gb * mp.GB
    out: list[RoleMemory] = []
    reasoner = generator = None
    if c.text_workers.num_gpus > 0 or c.text_learners.num_gpus > 0:
        r = cfg.models.reasoner
        reasoner = lm_shape(model_config_dir("models.reasoner", r.path, r.config))
    if c.diffusion_workers.num_gpus > 0 or c.diffusion_learners.num_gpus > 0:
        g = cfg.models.generator
        generator = pipeline_shape(model_config_dir("models.generator", g.path, g.config))
    if c.text_workers.num_gpus > 0:
        w = c.text_workers
        out.append(_engine("text_workers", "reasoner on vLLM", reasoner, cfg.models.reasoner.dtype,
                           w.tensor_parallel_size, cfg.models.reasoner.gpu_memory_utilization, cfg.models.reasoner.max_model_len,
                           gpu, w.num_gpus, "models.reasoner", "cluster.text_workers.tensor_parallel_size"))
    if c.diffusion_workers.num_gpus > 0:
        out.append(_diffusion_worker(cfg, generator, _share(gpu, c.diffusion_workers.num_gpus)))
    if c.judge_replicas.num_gpus > 0 and cfg.judge.kind == "vlm":
        j = cfg.judge
        shape = lm_shape(model_config_dir("judge", j.path, j.config))
        per_gpu = c.judge_replicas.num_gpus / j.tensor_parallel_size
        out.append(_engine("judge_replicas", "VLM judge on vLLM", shape, j.dtype, j.tensor_parallel_size,
                           j.gpu_memory_utilization or JUDGE_GPU_UTILIZATION, j.max_model_len, gpu, per_gpu, "judge",
                           "judge.tensor_parallel_size"))
    if c.text_learners.num_gpus > 0:
        out.append(_text_learner(cfg, reasoner, _share(gpu, c.text_learners.num_gpus)))
    if c.diffusion_learners.num_gpus > 0:
        out.append(_diffusion_learner(cfg, generator, _share(gpu, c.diffusion_learners.num_gpus)))
    return out


def check_launch(cfg: R3Config, plans: list[RoleMemory] | None = None) -> None:
    """Refuse (ConfigError) a config whose placement or memory does not fit `cluster.hardware`.

    Nothing is checked when no hardware is declared. `plans`: an already computed `memory_plan(cfg)`."""
    if cfg.cluster.hardware is None:
        return
    misfit = placement_misfit(cfg)
    if misfit:
        raise ConfigError(misfit)
    bad = [p for p in (memory_plan(cfg) if plans is None else plans) if p.fits is False]
    if bad:
        raise ConfigError("GPU memory does not fit cluster.hardware.gpu_memory_gb="
                          f"{cfg.cluster.hardware.gpu_memory_gb:g}:\n  " + "\n  ".join(_verdict(p) for p in bad))


def format_memory_plan(plans: list[RoleMemory], cfg: R3Config) -> str:
    hw = cfg.cluster.hardware
    where = ("hardware not declared (cluster.hardware): no verdict" if hw is None else
             f"{hw.nodes} nodes x {hw.gpus_per_node} GPUs of {hw.gpu_memory_gb:g} GB")
    lines = [f"memory plan (per GPU, GB = 1e9 bytes; {where}):"]
    if not plans:
        lines.append("  no role has GPUs: nothing to plan")
    for p in plans:
        lines.append(f"  {p.role}: {p.title}")
        lines.append("    " + ", ".join(f"{k.replace('_', ' ')} {v / mp.GB:.2f}" for k, v in p.parts.items()))
        lines += [f"    {n}" for n in p.notes]
        lines.append(f"    {_verdict(p)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- roles


def _share(gpu: float | None, num_gpus: float) -> float | None:
    """Memory an actor may use on one of its GPUs: all of it, or its fraction when it asks for less than one."""
    return None if gpu is None else gpu * min(1.0, num_gpus)


def _decide(p: RoleMemory, capacity: float | None, fits: bool, problem: str, fixes: list[str]) -> RoleMemory:
    p.capacity = capacity
    if capacity is not None:
        p.fits, p.problem, p.fixes = fits, ("" if fits else problem), ([] if fits else fixes)
    return p


def _verdict(p: RoleMemory) -> str:
    if p.fits is None:
        return f"total {p.total / mp.GB:.2f} GB"
    if p.fits:
        return f"total {p.total / mp.GB:.2f} of {p.capacity / mp.GB:.2f} GB: fits"
    return (f"{p.role}: does not fit: {p.problem}. Ways out: " + "; ".join(p.fixes))


def _engine(role: str, what: str, shape: Any, dtype: str, tp: int, util: float, max_len: int,
            gpu: float | None, gpu_share: float, section: str, tp_key: str) -> RoleMemory:
    """A vLLM engine on `gpu_share` of each of its GPUs (`gpu`: one whole GPU's bytes, None: undeclared).

    vLLM sizes its KV cache from `util` of the WHOLE device, whatever share Ray reserved, so an engine
    on a fraction of a GPU fits only when `util` stays within that fraction."""
    est = mp.engine_memory(shape.params, mp.DTYPE_BYTES[dtype], tp, shape.layers, shape.kv_heads, shape.head_dim,
                           util, gpu)
    p = RoleMemory(role, f"{what}, {shape.params / 1e9:.2f} B params, {dtype}, tensor parallel {tp}",
                   {"weights": est.weights}, total=est.weights)
    p.notes.append(f"KV cache: {est.bytes_per_token / 1024:.0f} KiB per token per GPU")
    if est.kv_budget is None:
        return p
    p.parts["kv_cache"] = max(0.0, est.kv_budget)
    p.total = est.weights + max(0.0, est.kv_budget)
    p.notes.append(f"KV cache budget {util:g} x {gpu / mp.GB:.0f} GB - weights = {est.kv_budget / mp.GB:.2f} GB: "
                   f"{est.kv_tokens:,} tokens ({est.kv_tokens / max_len:.1f} sequences of {section}.max_model_len "
                   f"{max_len})")
    share = min(1.0, gpu_share)
    if util > share + 1e-9:
        return _decide(p, gpu * share, False,
                       f"vLLM takes {section}.gpu_memory_utilization={util:g} of the whole GPU ({util * gpu / mp.GB:.2f} GB) "
                       f"but the role reserves {share:g} of it ({share * gpu / mp.GB:.2f} GB), so it would take the "
                       "memory of the roles sharing that GPU",
                       [f"set {section}.gpu_memory_utilization <= {share:g}", "give the role whole GPUs (num_gpus >= 1)"])
    fixes = [f"raise {tp_key} (weights and KV heads split over more GPUs)", f"lower {section}.max_model_len",
             f"use {section}.dtype=bfloat16" if dtype == "float32" else "use a smaller model"]
    return _decide(p, gpu * share, est.kv_tokens >= max_len,
                   f"weights {est.weights / mp.GB:.2f} GB leave room for {est.kv_tokens:,} KV tokens, fewer than one "
                   f"sequence of {max_len}", fixes)


def _diffusion_worker(cfg: R3Config, shape: Any, gpu: float | None) -> RoleMemory:
    g, f = cfg.models.generator, cfg.flow_grpo
    wb = mp.DTYPE_BYTES[g.dtype]
    batch = cfg.r3.group_size * (2 if f.train_cfg_scale > 1 else 1)
    tokens = batch * _image_tokens(cfg)
    parts = {"weights": shape.params * wb, "activations": mp.layer_activation_bytes(tokens, shape.transformer_hidden, wb)}
    p = RoleMemory("diffusion_workers", f"generator pipeline on diffusers, {shape.params / 1e9:.2f} B params "
                   f"(transformer {shape.transformer_params / 1e9:.2f} B, "
                   + ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in shape.other_params.items()) + f"), {g.dtype}",
                   parts, total=sum(parts.values()))
    p.notes.append(f"activations: one block at a time (no grad), {batch} images of {_image_tokens(cfg)} tokens "
                   "(r3.group_size, x2 with CFG)")
    return _decide(p, gpu, p.total <= (gpu or 0), f"{p.total / mp.GB:.2f} GB > {(gpu or 0) / mp.GB:.2f} GB",
                   ["use models.generator.dtype=bfloat16" if g.dtype == "float32" else "lower models.generator.height/width",
                    "give each worker a whole GPU (cluster.diffusion_workers.num_gpus=1)"])


def _image_tokens(cfg: R3Config) -> int:
    """Transformer tokens of one edit: target and reference image latents (VAE /8, 2x2 patches) plus the T5 prompt."""
    g = cfg.models.generator
    return 2 * (g.height // 16) * (g.width // 16) + g.max_sequence_length


def _text_learner(cfg: R3Config, shape: Any, gpu: float | None) -> RoleMemory:
    s, n = cfg.grpo, cfg.cluster.text_learners.count
    tokens = s.micro_batch_size * cfg.models.reasoner.max_model_len

    def acts(checkpointing: bool, batch: int) -> float:
        t = batch * cfg.models.reasoner.max_model_len
        return (mp.activation_bytes(t, shape.hidden, shape.layers, checkpointing)
                + mp.logits_bytes(batch, s.max_tokens, shape.vocab))

    note = (f"activations: micro_batch_size {s.micro_batch_size} x models.reasoner.max_model_len "
            f"{cfg.models.reasoner.max_model_len} = {tokens} tokens (an upper bound), answer logits of {s.max_tokens} "
            "tokens")
    return _learner("text_learners", "grpo", "reasoner", shape, s, n, LM_LORA_TARGETS, acts, note, gpu)


def _diffusion_learner(cfg: R3Config, shape: Any, gpu: float | None) -> RoleMemory:
    f, n = cfg.flow_grpo, cfg.cluster.diffusion_learners.count
    per_item = _image_tokens(cfg)

    def acts(checkpointing: bool, batch: int) -> float:
        return mp.activation_bytes(batch * per_item, shape.transformer_hidden, shape.transformer_layers, checkpointing)

    note = (f"activations: micro_batch_size {f.micro_batch_size} x {per_item} tokens (edit: target + reference image "
            "+ prompt); the CFG branch is detached")
    return _learner("diffusion_learners", "flow_grpo", "generator transformer", dataclasses.replace(
        shape, other_params={}), f, n, FLUX_LORA_TARGETS, acts, note, gpu)


def _learner(role: str, key: str, what: str, shape: Any, section: Any, dp: int,
             default_targets: tuple[str, ...], acts: Any, note: str, gpu: float | None) -> RoleMemory:
    dtype = section.dtype  # grpo.dtype / flow_grpo.dtype: the learner's own (float32 or bfloat16)
    wb = mp.DTYPE_BYTES[dtype]
    linears = [(x.name, x.in_features, x.out_features) for x in shape.linears]
    rank = int(_lora_setting(section, "rank") or 0)
    targets = (_lora_setting(section, "target_modules") or default_targets) if rank else default_targets
    trainable = mp.lora_params(linears, rank, targets) if rank else shape.params
    gc, mb = section.gradient_checkpointing, section.micro_batch_size
    merged = mp.lora_adapted_params(linears, targets) if rank else 0
    setup = mp.LearnerSetup(shape.params, trainable, wb, section.zero_stage, dp, section.kl_coef > 0, rank > 0,
                            shape.largest_layer_params, acts(gc, mb), merged)
    est = mp.learner_memory(setup)
    mode = f"LoRA rank {rank} ({trainable / 1e6:.1f} M trained)" if rank else "full fine-tuning"
    p = RoleMemory(role, f"{what}, {shape.params / 1e9:.2f} B params, {mode}, {dtype}, ZeRO-{section.zero_stage} "
                   f"over {dp} learners", dict(est.parts), total=est.total)
    p.notes.append(note)
    p.notes.append(f"activations {'with' if gc else 'without'} gradient checkpointing {acts(gc, mb) / mp.GB:.2f} GB, "
                   f"{'without' if gc else 'with'} {acts(not gc, mb) / mp.GB:.2f} GB")

    def total(**change: Any) -> str:
        s = dataclasses.replace(setup, **change)
        return f"{mp.learner_memory(s).total / mp.GB:.1f} GB"

    fixes = []
    if not rank:
        lora_n = mp.lora_params(linears, SUGGESTED_LORA_RANK, default_targets)
        lora_merged = mp.lora_adapted_params(linears, default_targets)
        fixes.append(f"LoRA ({key}.lora.rank={SUGGESTED_LORA_RANK} on {', '.join(default_targets)}): "
                     f"{total(trainable=lora_n, lora=True, merged_params=lora_merged)}")
    if section.zero_stage < 3:
        fixes.append(f"{key}.zero_stage=3: {total(zero_stage=3)}")
    if not gc:
        fixes.append(f"{key}.gradient_checkpointing=true: {total(activations=acts(True, mb))}")
    if mb > 1:
        fixes.append(f"{key}.micro_batch_size=1 (fewer samples per micro-batch): {total(activations=acts(gc, 1))}")
    fixes.append(f"DeepSpeed optimizer offload to CPU memory (offload_optimizer, not a config key yet): "
                 f"{(est.total - est.parts['optimizer']) / mp.GB:.1f} GB")
    fixes.append(f"more learners (cluster.{role}.count) shard ZeRO state further")
    return _decide(p, gpu, est.total <= (gpu or 0), f"{est.total / mp.GB:.2f} GB > {(gpu or 0) / mp.GB:.2f} GB",
                   fixes)


def _lora_setting(section: Any, key: str) -> Any:
    """`<section>.lora.<key>` (a config section or a mapping), None when the section has no LoRA settings."""
    lora = getattr(section, "lora", None)
    return lora.get(key) if isinstance(lora, dict) else getattr(lora, key, None)
