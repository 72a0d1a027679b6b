"""One more flow-matching stage on a finished warm start's generator:
`python -m examples.shapesworld.more_flow --out DIR [--base DIR] [--steps 2400] [--lr 1e-3] [--layout L]`.

The shipped warm start stops its generator early on purpose, so RL has something to improve. How
early matters: RL mostly improves prompts the warm start already draws right some of the time
(`examples.shapesworld.headroom`), so a generator trained further gives RL other prompts to work
on. This makes such a generator without rebuilding the whole warm start (about 30 minutes): it
loads `BASE/flux`, trains its transformer and text encoders with the warm start's own flow stage
(`examples.shapesworld.generator_sft.train_flow`: the same rendered pool, batch, edit share and
σ sampling; a fresh optimizer and warm-up-cosine schedule over `--steps`; the next seed after the
base's stages, so chained runs draw other batches) and writes:
- `DIR/flux`: the further-trained generator, stored in the base's storage dtype;
- `DIR/vlm`: a copy of the base's reasoner, unchanged (it was tuned on the base generator's own
  images, not on this one's);
- `DIR/manifest.json`: the command, the base folder and the sha256 of its manifest, the stage's
  settings, its loss and wall time, the held-out accuracies of the new generator (measured as the
  warm start measures its own) and the sha256 of every file.

`--layout random` renders that pool in the random layout instead of the base's. The shipped warm
start learns the canonical one (one image per prompt), and draws most prompts right always or never;
this asks whether a generator that has seen places, sizes and colours vary draws more prompts right
sometimes. (Measured from the shipped warm start, 2,400 steps: no, it draws fewer prompts right at
all; docs/reports/shapesworld-arms.md.)

Use it as `models.generator.path=DIR/flux models.reasoner.path=DIR/vlm`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

__all__ = ["more_flow", "main"]

logger = logging.getLogger(__name__)


def more_flow(
    base: Path, out: Path, steps: int, lr: float, eval_prompts: int, command: str, layout: str | None = None
) -> dict[str, Any]:
    """Train `base`'s generator `steps` more flow steps at peak learning rate `lr` into `out`, on a
    pool rendered in `layout` (None: the base's); returns the manifest it writes. `out` must not
    hold a warm start already."""
    import torch
    from diffusers import FluxKontextPipeline

    from examples.shapesworld.generator_sft import evaluate_generator, train_flow
    from examples.shapesworld.layout import LAYOUTS
    from examples.shapesworld.models import MODEL_FOLDERS
    from examples.shapesworld.pretrain import file_sha256, loss_summary, model_file_hashes
    from examples.shapesworld.recipe import PretrainSettings, make_pool
    from examples.shapesworld.tasks import build_splits

    base_manifest = base / "manifest.json"
    if not base_manifest.is_file():
        raise ValueError(f"--base {base}: no manifest.json there (not a finished warm start)")
    if (out / "manifest.json").exists():
        raise ValueError(f"--out {out} already holds a warm start; choose another folder")
    built = json.loads(base_manifest.read_text())
    s = replace(PretrainSettings(**built["settings"]), eval_prompts=eval_prompts)
    layout = s.layout if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: not one of {', '.join(LAYOUTS)}")
    # a fresh seed: the pretrain's two flow stages use seed and seed + 1, an earlier more_flow its own
    stage = replace(
        s, flow_steps=steps, flow_lr=lr, layout=layout, seed=built.get("stage", {}).get("seed", s.seed + 1) + 1, scale=1.0
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        torch.manual_seed(stage.seed)
        pipe = FluxKontextPipeline.from_pretrained(str(base / "flux"), dtype=torch.float32)
        splits = build_splits(seed=0)
        pool = make_pool(splits.train, s.steps("pool"), seed=s.seed, size=s.size, layout=stage.layout)
        start = time.perf_counter()
        losses = train_flow(pipe, pool, stage, torch.Generator().manual_seed(stage.seed))
        flow_s = time.perf_counter() - start
        pipe.to(dtype=getattr(torch, s.storage_dtype)).save_pretrained(str(tmp / "flux"), safe_serialization=True)
        shutil.copytree(base / "vlm", tmp / "vlm")
        start = time.perf_counter()
        generator_eval = evaluate_generator(tmp / "flux", splits.test, s)
        manifest = {
            "command": command,
            "base": str(base),
            "base_manifest_sha256": file_sha256(base_manifest),
            "stage": {"steps": steps, "lr": lr, "seed": stage.seed, "batch": stage.batch, "layout": stage.layout},
            "settings": asdict(s),
            "losses": {"flow": loss_summary(losses)},
            "times": {"flow_s": round(flow_s, 1), "generator_eval_s": round(time.perf_counter() - start, 1)},
            "generator_eval": generator_eval,
            "files": model_file_hashes(tmp),
        }
        for part in MODEL_FOLDERS:
            shutil.rmtree(out / part, ignore_errors=True)
            (tmp / part).rename(out / part)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # last: the folder is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    from examples.shapesworld.layout import LAYOUTS
    from examples.shapesworld.models import WARM_START
    from examples.shapesworld.recipe import PretrainSettings

    p = argparse.ArgumentParser(prog="python -m examples.shapesworld.more_flow", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="new warm-start folder (flux/, vlm/, manifest.json)")
    p.add_argument("--base", type=Path, default=WARM_START, help=f"finished warm start to start from (default {WARM_START})")
    p.add_argument("--steps", type=int, default=2400, help="flow steps of the new stage")
    p.add_argument("--lr", type=float, default=1e-3, help="its peak learning rate (the second stage's)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="layout of the rendered pool (default: the base's; random: many images per prompt)")  # fmt: skip
    p.add_argument("--eval-prompts", type=int, default=PretrainSettings.eval_prompts, help="held-out prompts measured")
    args = p.parse_args(argv)
    if args.steps < 1 or args.lr <= 0 or args.eval_prompts < 1:
        print(f"error: --steps {args.steps}, --lr {args.lr}, --eval-prompts {args.eval_prompts}; "
              "allowed: steps >= 1, lr > 0, eval-prompts >= 1", file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = sys.argv[1:] if argv is None else list(argv)
    try:
        manifest = more_flow(args.base, args.out, args.steps, args.lr, args.eval_prompts,
                             command=shlex.join([*p.prog.split(), *given]), layout=args.layout)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps({k: manifest[k] for k in ("losses", "times", "generator_eval")}, indent=1) + "\n")
    logger.info("saved to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
