"""GRPO learner for the reasoner (causal LM or Idefics3-style VLM) on DeepSpeed.

Design: docs/design.md#grpo-for-the-reasoner.

Log-probs of the answer tokens are recomputed the way the sampler (vLLM) built its distribution:
logit bias, then logits / T, then the top-p nucleus cut and renormalisation (`logprobs.token_logprobs`),
so they equal vLLM's `processed_logprobs` and the first update's ratio is 1. The policy trained is
the truncated one: a sampled token outside the current nucleus has log-prob −inf (ratio 0, no
gradient; counted in `outside_nucleus_frac`). The loss is `grpo_loss` + β·KL(k1|k2|k3) to a frozen
reference copy, aggregated with one global normalizer over all ranks and micro-batches so data
parallelism and gradient accumulation give the full-batch gradient. The KL is taken between the
untruncated tempered distributions of policy and reference: the reference's nucleus soon misses
sampled tokens, where every estimator is infinite. top-k is not replayed (the workers leave it off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from learners import algos, ds_engine, finite, lean_init, memory
from learners.learner_base import LearnerBase
from learners.logprobs import token_logprobs
from learners.lora import LoraAdapters, lora_rank_of
from rollout.trajectory import TextSample

__all__ = ["TextLearner"]

log = logging.getLogger(__name__)


class TextLearner(LearnerBase):
    """One rank of the reasoner's learner group; every public call is collective over ranks."""

    def __init__(
        self,
        *,
        model_path: str,
        zero_stage: int = 1,
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        adam_eps: float = 1e-8,
        warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        min_lr_ratio: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch_size: int = 4,
        dtype: str = "float32",
        temperature: float = 1.0,
        top_p: float = 1.0,
        kl_coef: float = 0.0,
        kl_kind: str = "k3",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        loss_agg: str = "token-mean",
        max_len: int | None = None,
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        backend: str | None = None,
    ) -> None:
        """Load the model from HF format and build the DeepSpeed engine.

        rank/world_size/master_*: the rendezvous; when omitted they are read from the environment
        (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and a lone process is a group of one.
        max_len: divisor of `seq-mean-token-sum-norm` (default: longest answer in the batch).
        temperature, top_p: the sampler's, replayed when recomputing log-probs.
        gradient_checkpointing: recompute the decoder layers' activations in the backward pass
        (also in the eval mode the learner runs in; `ds_engine.checkpoint_in_eval`).
        dtype: "float32", or "bfloat16" = bf16 weights and activations with fp32 master weights
        in the optimizer (DeepSpeed's bf16 mode); the model is loaded in it (`grpo.dtype`).
        lora: {rank, alpha, dropout, target_modules} (`grpo.lora`); rank > 0 trains LoRA adapters
        only, and the reference of the KL is the base (adapters off, no second copy; `learners.lora`).
        """
        algos.get_agg(loss_agg)
        algos.get_kl(kl_kind)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (grpo.top_p; 1 = no nucleus cut), got {top_p}")
        self._setup_dist(rank, world_size, master_addr, master_port, backend, seed)
        self.model_path = str(model_path)
        self.micro_batch_size = micro_batch_size
        self.temperature, self.top_p = temperature, top_p
        self.kl_coef, self.kl_kind = kl_coef, kl_kind
        self.clip_low, self.clip_high = clip_low, clip_high
        self.loss_agg, self.max_len = loss_agg, max_len
        self.dtype = ds_engine.resolve_dtype(dtype)
        config = ds_engine.build_ds_config(
            zero_stage=zero_stage, lr=lr, betas=betas, weight_decay=weight_decay, adam_eps=adam_eps,
            grad_clip=grad_clip, micro_batch_size=micro_batch_size, world_size=self.world_size,
            dtype=self.dtype, hidden_size=self._hidden_size())

        # ---- lean loading (docs/design.md#lean-learners-under-zero-3): ZeRO-3 partitions at construction
        want_reference = kl_coef > 0 and not lora_rank_of(lora)  # LoRA: the reference is the base
        with memory.measured_span() as self.load_memory:  # what loading costs this rank (memory_stats)
            model, *refs = lean_init.load_pretrained_partitioned(self._load_model, self._build_model, config,
                                                                 copies=2 if want_reference else 1)
        reference = refs[0] if refs else None
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.ref_model = None
        if reference is not None:  # sharded like the policy under ZeRO-3, else a whole frozen copy
            reference.eval().requires_grad_(False)
            self.ref_model = (lean_init.reference_engine(reference, config) if lean_init.is_zero3(config)
                              else reference.to(self.device))
        # ---- end lean loading
        self.lora = LoraAdapters.apply(model, **lora, seed=seed) if lora_rank_of(lora) else None  # docs/design.md#lora
        if self.lora is not None and gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed layers still need a grad input
        self.engine = ds_engine.initialize_engine(model, config, warmup_steps, lr_decay_steps, min_lr_ratio)
        self.engine.eval()  # no dropout: the recomputed log-probs must equal the sampler's
        if gradient_checkpointing:
            ds_engine.checkpoint_in_eval(self.engine.module)
        self.processor = self._load_processor() if self.is_vlm else None
        cfg = self.engine.module.config
        self.pad_id = int(getattr(cfg, "pad_token_id", None) or getattr(
            getattr(cfg, "text_config", None), "pad_token_id", None) or 0)

    # ---- public -----------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, samples: Sequence[TextSample], images: Sequence[Any] | None = None,
                         temperature: float | None = None, reference: bool = False,
                         top_p: float | None = None) -> list[list[float]]:
        """Answer-token log-probs under the current (or reference) model, one list per sample.

        temperature/top_p default to the learner's (the sampler's), so before an update these equal
        vLLM's processed log-probs. Collective only under ZeRO-3 (parameters are gathered in the
        forward): then every rank must call it with the same number of samples; otherwise any
        single rank may call it.
        """
        zero3 = self.engine.zero_optimization_stage() == 3
        if reference and self.ref_model is None and self.lora is None:
            raise ValueError("reference log-probs need kl_coef > 0 (no reference model was loaded)")
        temp = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        out: list[list[float]] = []
        for sl in self._plan_micro_batches(len(samples), collective=zero3):
            batch = list(samples[sl])
            imgs = None if images is None else list(images[sl])
            logits, tgt, mask = self._answer_logits(batch, imgs, reference)
            lp = token_logprobs(logits, tgt, temp, top_p)
            out += [lp[i, : int(mask[i].sum())].tolist() for i in range(len(batch))]
        return out

    def train_step(self, samples: Sequence[TextSample], advantages: Sequence[float],
                   images: Sequence[Any] | None = None, temperature: float | None = None,
                   top_p: float | None = None) -> dict[str, float]:
        """One GRPO update on this rank's shard (collective: every rank calls it together).

        samples: this rank's TextSamples (behaviour log-probs in `logprobs`); advantages: one per
        sample; images: one (H, W, 3) uint8 array or None per sample (VLM only); temperature/top_p:
        the sampler's, default the learner's. Returns metrics reduced over all ranks; a step with
        non-finite advantages, losses or gradients makes no update (`skipped_nonfinite` 1, `learners.finite`).
        """
        if len(samples) != len(advantages):
            raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
        if images is not None and len(images) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(images)} images")
        for s in samples:
            if len(s.logprobs) != len(s.answer_ids):
                raise ValueError(f"sample has {len(s.answer_ids)} answer tokens but {len(s.logprobs)} logprobs")
        start = time.perf_counter()
        nonfinite_adv = self._begin_update(advantages)
        if nonfinite_adv:
            return self._refused_update(nonfinite_adv, start)
        temp = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        micro = self._plan_micro_batches(len(samples))
        lengths = [len(s.answer_ids) for s in samples]
        mask_all = _length_mask(lengths)
        normalizer = ds_engine.all_reduce_sum(algos.agg_normalizer(mask_all, self.loss_agg))
        max_len = self.max_len or int(ds_engine.all_reduce_max(max(lengths)))
        ds_engine.set_micro_batches(self.engine, len(micro))
        scale = ds_engine.micro_loss_scale(self.engine, len(micro))
        self._lr_used = self.engine.get_lr()[0]
        adv_all = torch.tensor(list(advantages), dtype=torch.float32)

        sums = dict.fromkeys(["pg_loss", "kl_loss", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean",
                              "outside_nucleus_frac", "num_tokens", "num_samples", "nonfinite_loss"], 0.0)
        mins, maxs = {"ratio_min": float("inf")}, {"ratio_max": float("-inf")}
        for j, sl in enumerate(micro):
            ds_engine.mark_accumulation_boundary(self.engine, j == len(micro) - 1)
            batch = list(samples[sl])
            imgs = None if images is None else list(images[sl])
            logits, tgt, mask = self._answer_logits(batch, imgs, reference=False, grad=True)
            lp = token_logprobs(logits, tgt, temp, top_p).masked_fill(mask == 0, 0.0)  # (B, T)
            old = _pad([s.logprobs for s in batch], lp.shape[1]).to(lp.device)
            adv = adv_all[sl].to(lp.device)
            terms = algos.grpo_loss_terms(lp, old, adv, mask, self.clip_low, self.clip_high,
                                          self.loss_agg, max_len, normalizer)
            loss = terms.loss
            ntok = float(mask.sum())
            if self.kl_coef > 0:
                # untruncated on both sides (module docstring); one more log-softmax only if top_p < 1
                lp_full = lp if top_p == 1.0 else token_logprobs(logits, tgt, temp)
                with torch.no_grad():
                    ref_logits, _, _ = self._answer_logits(batch, imgs, reference=True)
                    ref = token_logprobs(ref_logits, tgt, temp)
                    del ref_logits
                kl_mat = algos.kl_estimate(lp_full, ref, self.kl_kind)  # finite: no cut
                kl_loss = algos.aggregate(kl_mat, mask, self.loss_agg, max_len, normalizer)
                loss = loss + self.kl_coef * kl_loss
                sums["kl_loss"] += float(kl_loss.detach())
                sums["kl"] += float((kl_mat.detach() * mask).sum())
            del logits
            sums["nonfinite_loss"] += float(finite.count_nonfinite(loss.detach()))
            self.engine.backward(finite.poison_nonfinite(loss) * scale)  # a non-finite loss: no update
            self._engine_step(is_last=j == len(micro) - 1)
            sums["pg_loss"] += float(terms.loss.detach())
            sums["clip_frac_low"] += float(terms.clip_frac_low) * ntok
            sums["clip_frac_high"] += float(terms.clip_frac_high) * ntok
            sums["ratio_mean"] += float(terms.ratio_mean) * ntok
            sums["outside_nucleus_frac"] += float((torch.isneginf(lp.detach()) & (mask > 0)).sum())
            sums["num_tokens"] += ntok
            sums["num_samples"] += len(batch)
            mins["ratio_min"] = min(mins["ratio_min"], float(terms.ratio_min))
            maxs["ratio_max"] = max(maxs["ratio_max"], float(terms.ratio_max))
        m = self._finish_step(sums, mins, maxs, start, unit="tokens")
        ntok = max(m["num_tokens"], 1.0)
        for k in ("kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "outside_nucleus_frac"):
            m[k] /= ntok
        m["loss"] = m["pg_loss"] + self.kl_coef * m["kl_loss"]
        return m

    # ---- model ------------------------------------------------------------------------------
    @property
    def is_vlm(self) -> bool:
        from transformers import AutoConfig

        if not hasattr(self, "_is_vlm"):
            cfg = AutoConfig.from_pretrained(self.model_path)
            self._is_vlm = getattr(cfg, "vision_config", None) is not None
        return self._is_vlm

    def _hidden_size(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(self.model_path).get_text_config().hidden_size)

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        cls = AutoModelForImageTextToText if self.is_vlm else AutoModelForCausalLM
        return cls.from_pretrained(self.model_path, dtype=self.dtype)  # the learner's dtype (grpo.dtype)

    def _build_model(self) -> torch.nn.Module:
        """`_load_model`'s class built from the checkpoint's config alone, weights not loaded
        (partitioned under ZeRO-3: `lean_init.load_pretrained_partitioned`)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        cls = AutoModelForImageTextToText if self.is_vlm else AutoModelForCausalLM
        return cls.from_config(AutoConfig.from_pretrained(self.model_path), dtype=self.dtype)

    def _load_processor(self):
        """The family's input builder (`rollout.model_inputs`): tokenizer, image inputs, image tokens."""
        from rollout.model_inputs import load_model_inputs

        return load_model_inputs(self.model_path)

    def _answer_logits(self, batch: list[TextSample], images: list[Any] | None, reference: bool,
                       grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampler-side logits (fp32, logit bias added) that predict each answer token.

        Returns logits (B, T_answer, V), the answer token ids (B, T_answer) and their mask
        (B, T_answer); padded positions hold token 0.
        """
        has_img = [images is not None and images[i] is not None for i in range(len(batch))]
        if any(has_img) and not self.is_vlm:
            raise ValueError(f"images given but {self.model_path} is a text-only model")
        t_ans = max(len(s.answer_ids) for s in batch)
        # Samples with and without an image are run as two sub-batches of one micro-batch.
        order: list[int] = []
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for flag in (False, True):
            rows = [i for i in range(len(batch)) if has_img[i] == flag]
            if rows:
                parts.append(self._forward_logits([batch[i] for i in rows],
                                                  [images[i] for i in rows] if flag else None,
                                                  reference, grad, t_ans))
                order += rows
        if len(parts) == 1:
            logits, tgt = parts[0]
        else:  # back to the batch's order
            inverse = torch.argsort(torch.tensor(order)).to(self.device)
            logits = torch.cat([p[0] for p in parts]).index_select(0, inverse)
            tgt = torch.cat([p[1] for p in parts]).index_select(0, inverse)
        return logits, tgt, _length_mask([len(s.answer_ids) for s in batch]).to(logits.device)

    def _forward_logits(self, batch: list[TextSample], images: list[Any] | None, reference: bool,
                        grad: bool, t_ans: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T_answer, V) biased fp32 logits and (B, T_answer) targets of one sub-batch."""
        ids = [list(s.prompt_ids) + list(s.answer_ids) for s in batch]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):  # right padding keeps default position ids correct
            input_ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "attention_mask": attn.to(self.device)}
        if images is not None:  # the family's image kwargs (Qwen-VL: grid and token types for mRoPE)
            kwargs.update(self.processor.image_kwargs(input_ids, [[_pil(im)] for im in images], self.device,
                                                      self.dtype))
        # Logits at position p-1+j predict answer token j of a prompt of length p. The LM head runs only
        # on positions [first, last) that predict some answer token (`logits_to_keep`, as TRL does): a
        # reflect prompt holds the image's hundreds of tokens, and (B, L, V) fp32 logits over a 150k
        # vocabulary would cost more memory and compute than the answer's few dozen positions.
        first = min(len(s.prompt_ids) for s in batch) - 1
        last = max(first + 1, max(len(s.prompt_ids) + len(s.answer_ids) for s in batch) - 1)
        kwargs["logits_to_keep"] = torch.arange(first, last, device=self.device)
        idx = torch.zeros((len(batch), t_ans), dtype=torch.long)
        tgt = torch.zeros((len(batch), t_ans), dtype=torch.long)
        for i, s in enumerate(batch):
            p, a = len(s.prompt_ids), len(s.answer_ids)
            idx[i, :a] = torch.arange(p - 1 - first, p - 1 - first + a)
            tgt[i, :a] = torch.tensor(s.answer_ids)
        with torch.set_grad_enabled(grad):
            logits = self._model(reference)(**kwargs).logits  # (B, last - first, V)
            picked = logits.gather(1, idx.to(self.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            # vLLM upcasts to fp32 and adds the logit bias before temperature and top-p
            picked = picked.float() + self._logit_bias(picked.shape[-1], picked.device)  # (B, T_answer, V)
        return picked, tgt.to(self.device)

    def _logit_bias(self, vocab: int, device: torch.device) -> torch.Tensor:
        """(V,) the sampler's logit bias: image placeholder tokens are never generated by a VLM."""
        if not hasattr(self, "_bias"):
            from rollout.special_tokens import BANNED_LOGIT_BIAS, image_placeholder_ids

            self._bias = torch.zeros(vocab)
            if self.is_vlm:
                self._bias[image_placeholder_ids(self.processor.tokenizer)] = BANNED_LOGIT_BIAS
        return self._bias.to(device)

    def _model(self, reference: bool):
        if self.lora is not None:  # the reference is the base: the same module with its adapters off
            return self.lora.forward_of(self.engine, self.engine.module, reference)
        if not reference:
            return self.engine
        return self.ref_model


def _length_mask(lengths: list[int]) -> torch.Tensor:
    t = max(lengths)
    return (torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()  # (B, T)


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def _pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
