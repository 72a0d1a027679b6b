"""One prompt through a trained policy: `python -m cluster.generate "PROMPT" --config FILE [--checkpoint DIR]
[--rounds 3] [--seed 0] [--out DIR]`.

Starts the evaluation's rollout workers and judge (`cluster.policy_session`, as `cluster.eval` and
`cluster.serve` do), runs the deterministic multi-round R3 chain on the prompt and writes into
`--out`: `round_<r>.png` for each round that drew or edited an image, `rounds.json` (every round's
plan or reflection, instruction, score and stop decision) and `report.html` (the rounds side by
side, text escaped, images embedded). Prints one line per round as it finishes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, load_config
from cluster.serve_api import MAX_ROUNDS

__all__ = ["main", "write_outputs"]

log = logging.getLogger("r3rl.generate")


def write_outputs(out: Path, trajectory: Any, seed: int, checkpoint: Path | None, version: int) -> list[Path]:
    """`round_<r>.png`, `rounds.json`, `report.html` under `out`; returns the PNG paths."""
    from cluster.gallery import write_gallery
    from cluster.serve_api import round_out
    from rollout.trajectory import png_bytes

    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for r in trajectory.rounds:
        if r.image is not None:
            path = out / f"round_{r.index}.png"
            path.write_bytes(png_bytes(r.image.image))
            pngs.append(path)
    rounds = [{k: v for k, v in round_out(r).model_dump().items() if k != "image_png_b64"}
              | {"image": f"round_{r.index}.png" if r.image is not None else None} for r in trajectory.rounds]
    (out / "rounds.json").write_text(json.dumps({
        "prompt": trajectory.prompt, "seed": seed, "checkpoint": str(checkpoint) if checkpoint else None,
        "weight_version": version, "stopped": bool(rounds) and rounds[-1]["stopped"], "rounds": rounds,
    }, indent=2))
    write_gallery(out / "report.html", [trajectory], title=f"R3RL: {trajectory.prompt}")
    return pngs


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m cluster.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="what the image should show")
    ap.add_argument("--config", default="configs/cpu_tiny.yaml")
    ap.add_argument("--checkpoint", default=None, help="a complete checkpoint folder or 'auto' (default: the config's models)")
    ap.add_argument("--rounds", type=int, default=3, help=f"1 generation + up to rounds-1 refinements (1..{MAX_ROUNDS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=None, help="the reasoner's (default: grpo.eval_temperature)")
    ap.add_argument("--out", default="runs/generate", help="output folder")
    ap.add_argument("overrides", nargs="*", help="config overrides a.b=c")
    args = ap.parse_intermixed_args(argv)  # the prompt, options and overrides in any order
    try:
        from cluster.policy_session import resolve_checkpoint

        if not args.prompt.strip():
            raise ValueError("the prompt is empty; give a description of the image")
        if not 1 <= args.rounds <= MAX_ROUNDS:
            raise ValueError(f"--rounds {args.rounds}: use 1..{MAX_ROUNDS}")
        if not 0 <= args.seed < 2**31:
            raise ValueError(f"--seed {args.seed}: use 0..{2**31 - 1}")
        cfg = load_config(args.config, args.overrides, check_paths=True)
        checkpoint = resolve_checkpoint(cfg, args.checkpoint)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    from cluster.policy_session import PolicySession
    from cluster.session import connect_ray

    started = connect_ray(cfg)
    session = None
    try:
        session = PolicySession(cfg, checkpoint).start()
        trajectory = session.run(args.prompt.strip(), args.rounds, args.seed, args.temperature, on_round=_print_round)
        version = session.version
    finally:
        if session is not None:
            session.shutdown()
        if started:
            ray.shutdown()
    out = Path(args.out)
    write_outputs(out, trajectory, args.seed, checkpoint, version)
    print(f"{len(trajectory.rounds)} round(s) written to {out} (report: {out / 'report.html'})")
    return 0


def _print_round(r: Any) -> None:
    what = "stop" if r.stopped else f"score {r.score:.3f}{' correct' if r.correct else ''}"
    text = (r.text.text if r.text is not None else "").replace("\n", " ")
    print(f"round {r.index}: {what} | {text[:120]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
