"""How much room a warm start leaves RL, before any run:
`python -m examples.shapesworld.warm_room --config CONFIG [--train-prompts 36] [--per-tag 20] [--out FILE] [a.b=c ...]`.

RL on the generator gains almost only on prompts its warm start already draws right some of the
time (`examples.shapesworld.headroom`), so whether a warm start is worth hours of arms runs can be
read off it in about half a minute. This probes the config's generator (`models.generator.path`)
on exactly the samples an arms run with the same `--train-prompts`, `--per-tag` and overrides
would probe (`examples.shapesworld.arms.fixed_prompt_sets`; sample i with the same noise), and
prints the accuracy on the training and held-out prompts and, per class of training prompt (never,
sometimes, always drawn right), the prompts, their share of the samples and the accuracy there.
`--out` also writes them as JSON.

Exit status: 0 done; 2 a bad argument or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["warm_room", "main"]


def warm_room(cfg: Any, per_tag: int) -> dict[str, Any]:
    """The probe of `cfg`'s generator on an arms run's samples: accuracies and the classes."""
    from cluster.session import resolve_model_path
    from examples.shapesworld.arms import fixed_prompt_sets, probe_settings
    from examples.shapesworld.headroom import warm_start_room
    from examples.shapesworld.probe import probe_generator

    prompts = fixed_prompt_sets(cfg, per_tag)
    g = cfg.models.generator
    probe = probe_generator(Path(resolve_model_path(g.path)), {"warm start": None}, prompts,
                            **probe_settings(cfg))["warm start"]  # fmt: skip
    train_prompts = [m["prompt"] for m in prompts["train"]]
    return {
        "generator": g.path,
        "samples": {split: len(metas) for split, metas in prompts.items()},
        "accuracy": {split: probe[split]["accuracy"] for split in ("train", "test")},
        "classes": [asdict(c) for c in warm_start_room(train_prompts, probe["train"]["correct"])],
    }


def room_markdown(room: dict[str, Any]) -> str:
    """The classes as a table, with the accuracies above it."""
    acc = room["accuracy"]
    lines = [f"`{room['generator']}`: {100 * acc['train']:.1f} % right on {room['samples']['train']} samples of the "
             f"training prompts, {100 * acc['test']:.1f} % on {room['samples']['test']} held-out samples",  # fmt: skip
             "", "| warm start draws it right | prompts | share of samples | right % |", "|---|---|---|---|"]
    for c in room["classes"]:
        right = "–" if c["prompts"] == 0 else f"{100 * c['right']:.1f}"
        lines.append(f"| {c['name']} | {c['prompts']} | {100 * c['share']:.0f} % | {right} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.shapesworld.warm_room", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the run config, e.g. examples/shapesworld/configs/shapes_cpu.yaml")
    ap.add_argument("--train-prompts", type=int, default=36, help="as the arms' --train-prompts (data.limit)")
    ap.add_argument("--per-tag", type=int, default=20, help="probe samples per tag, as the arms' --per-tag")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. models.generator.path=DIR/flux")
    args = ap.parse_args(argv)
    from cluster.config import ConfigError, load_config

    try:
        if args.train_prompts < 1 or args.per_tag < 1:
            raise ValueError(f"--train-prompts {args.train_prompts}, --per-tag {args.per_tag}; allowed: >= 1")
        cfg = load_config(args.config, [f"data.limit={args.train_prompts}", "data.eval_limit=null",
                                        f"data.eval_per_category={args.per_tag}", *args.overrides], check_paths=True)  # fmt: skip
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    room = warm_room(cfg, args.per_tag)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(room, indent=1) + "\n")
    sys.stdout.write(room_markdown(room))
    return 0


if __name__ == "__main__":
    sys.exit(main())
