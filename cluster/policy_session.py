"""A trained policy, ready to answer prompts: the evaluation's rollout workers and judge, one R3 chain per prompt.

`PolicySession.start` builds exactly what `cluster.eval` builds (the text and diffusion worker pools
in their placement groups, the judge behind Ray Serve) and loads a checkpoint's weights into the
workers (`cluster.eval.load_checkpoint_weights`; a replaced worker loads them again before it
serves). `PolicySession.run` runs the evaluation's deterministic multi-round R3
(`rollout.chain.run_chain` with `rollout.evaluation.EvalSettings`: ODE sampling, one sample, seeds
from the request's seed) on one prompt, reporting each round as it finishes. The reasoner and
generator can be swapped per call (the Serve app passes batching proxies that merge concurrent
requests' calls into one pool call).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.config import R3Config

__all__ = ["PolicySession", "RequestCancelled", "resolve_checkpoint"]

log = logging.getLogger("r3rl.policy")


class RequestCancelled(RuntimeError):
    """The caller gave up on a chain (timeout): it ends at the next round boundary."""


def resolve_checkpoint(cfg: R3Config, checkpoint: str | None) -> Path | None:
    """`--checkpoint` as `cluster.eval` reads it (a checkpoint folder, or 'auto': the newest under train.run_dir);
    None keeps the config's models.

    Raises:
        ValueError: no complete checkpoint there (the message names the path).
    """
    if checkpoint is None:
        return None
    from cluster.checkpoint import resolve_resume

    found = resolve_resume(checkpoint, Path(cfg.train.run_dir), cfg.train.run_name)
    if found is None:
        raise ValueError(f"--checkpoint {checkpoint}: no complete checkpoint under train.run_dir={cfg.train.run_dir!r}; "
                         "give a checkpoint folder, or leave --checkpoint out to serve the config's models")
    return Path(found).resolve()


class PolicySession:
    """The rollout workers and judge of `cfg`, holding `checkpoint`'s weights (or the config's models)."""

    def __init__(self, cfg: R3Config, checkpoint: Path | None = None):
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.version = 0
        self.text = self.image = self.judge = None
        self._placements: dict[str, Any] = {}

    def start(self) -> PolicySession:
        """Place and start the workers and the judge; load the checkpoint. Cleans up if anything fails."""
        from cluster.eval import load_checkpoint_weights
        from cluster.roles import build_judge_client, build_worker_pools, place_roles, resolve_paths

        paths = resolve_paths(self.cfg)
        self._placements = place_roles(self.cfg, ("text_workers", "diffusion_workers"))
        try:
            hooks = self._reload_hooks() if self.checkpoint is not None else None
            self.text, self.image = build_worker_pools(self.cfg, paths, self._placements, hooks)
            self.judge = build_judge_client(self.cfg, paths)
            if self.checkpoint is not None:
                self.version = load_checkpoint_weights(self.text, self.image, self.checkpoint,
                                                       self.cfg.train.remote_timeout_s, self._generator_weights())
        except BaseException:
            self.shutdown()
            raise
        log.info("policy ready: %s (weight version %d)", self.checkpoint or "the config's models", self.version)
        return self

    def reasoner(self) -> Any:
        from cluster.pools import PoolReasoner

        return PoolReasoner(self.text)

    def generator(self) -> Any:
        from cluster.pools import PoolGenerator

        return PoolGenerator(self.image)

    def run(
        self,
        prompt: str,
        max_rounds: int,
        seed: int = 0,
        temperature: float | None = None,
        *,
        on_round: Callable[[Any], None] | None = None,
        cancelled: threading.Event | None = None,
        reasoner: Any = None,
        generator: Any = None,
    ) -> Any:
        """One evaluation chain on `prompt`: a `rollout.trajectory.Trajectory` of 1..max_rounds rounds.

        `on_round(round)` gets each `Round` as soon as it is done; once `cancelled` is set the chain
        raises `RequestCancelled` at the next round boundary. Same seed, same workers -> same rounds.
        """
        from cluster.settings import eval_settings
        from rollout.chain import run_chain
        from rollout.datasets import PromptRecord

        if self.text is None:
            raise RuntimeError("PolicySession.run before start()")
        base = eval_settings(self.cfg)
        settings = replace(base, max_rounds=max_rounds, seed=seed,
                           temperature=base.temperature if temperature is None else temperature)
        record = PromptRecord(prompt, metadata={}, category="", source="request")

        def after_round(trajectories: list[Any]) -> None:
            if cancelled is not None and cancelled.is_set():
                raise RequestCancelled(f"chain on {prompt[:40]!r} cancelled after round {len(trajectories[0].rounds) - 1}")
            if on_round is not None:
                on_round(trajectories[0].rounds[-1])

        # exactly rollout.evaluation.evaluate's chain for one record, with this request's seed
        (trajectory,) = run_chain([record], reasoner or self.reasoner(), generator or self.generator(), self.judge,
                                  settings.stage_settings(), random.Random(settings.seed), settings.max_rounds,
                                  stages=("eval", "eval"), on_round=after_round)
        return trajectory

    def shutdown(self) -> None:
        """Remove the judge app, kill the workers, give back their placement groups (best effort)."""
        import ray

        from cluster.roles import remove_placements

        if self.judge is not None:
            try:
                self.judge.shutdown()
            except Exception as e:  # Serve may already be down
                log.warning("judge shutdown: %s", e)
        for pool in (self.text, self.image):
            for a in pool.actors if pool is not None else []:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # already gone
                    pass
        remove_placements(self._placements)
        self.text = self.image = self.judge = None
        self._placements = {}

    def _generator_weights(self) -> Path:
        """The generator folder evaluation uses: the checkpoint's EMA when the run kept one
        (`cluster.ema_eval.generator_eval_weights`), else its live weights."""
        from cluster.ema_eval import generator_eval_weights

        return generator_eval_weights(self.cfg, self.checkpoint)

    def _reload_hooks(self) -> dict[str, Callable[[int, Any], None]]:
        """A replacement worker loads the checkpoint's weights before it serves."""
        import ray

        def hook(sub: str) -> Callable[[int, Any], None]:
            def load(index: int, actor: Any) -> None:
                folder = str(self._generator_weights() if sub == "diffusion_learner"
                             else self.checkpoint / sub / "weights")
                ray.get(actor.load_weights.remote(self.version, folder), timeout=self.cfg.train.remote_timeout_s)
                log.info("replacement worker %d loaded %s", index, folder)

            return load

        return {"text_workers": hook("text_learner"), "diffusion_workers": hook("diffusion_learner")}
