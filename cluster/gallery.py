"""A self-contained HTML page of trajectories: per-round images, reflections, scores, stops."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from rollout.trajectory import Trajectory, png_bytes

__all__ = ["write_gallery"]

_STYLE = """
body{font-family:sans-serif;margin:1.5em;background:#fafafa}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:6px;vertical-align:top;font-size:13px}
img{width:128px;height:128px;image-rendering:pixelated;display:block}
.stop{color:#b35c00;font-weight:bold}.ok{color:#1a7f37}.bad{color:#c62828}
.txt{max-width:220px;white-space:pre-wrap;word-break:break-word;font-family:monospace;font-size:11px}
"""


def write_gallery(path: str | Path, trajectories: Sequence[Trajectory], title: str = "R3RL trajectories") -> Path:
    """Write `path` (images embedded as data URLs, no external files) and return it."""
    max_rounds = max((len(t.rounds) for t in trajectories), default=0)
    head = "".join(f"<th>round {r}</th>" for r in range(max_rounds))
    rows = []
    for i, t in enumerate(trajectories):
        cells = [f"<td><b>{i}</b><br>{html.escape(t.prompt)}<br><small>{html.escape(str(t.metadata.get('tag', '')))}</small></td>"]
        for r in t.rounds:
            img = ""
            if r.image is not None:
                data = base64.b64encode(png_bytes(r.image.image)).decode()
                img = f'<img class="round-image" alt="round {r.index}" src="data:image/png;base64,{data}">'
            verdict = '<span class="ok">correct</span>' if r.correct else '<span class="bad">wrong</span>'
            stop = '<div class="stop">stop: no further edit</div>' if r.stopped else ""
            text = html.escape(r.text.text) if r.text is not None else ""
            cells.append(
                f"<td>{img}<div>score {r.score:.3f} {verdict}</div>{stop}"
                f'<div class="txt">{text}</div></td>'
            )
        cells += ["<td></td>"] * (max_rounds - len(t.rounds))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(trajectories)} trajectories</p><table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"
        "</body></html>"
    )
    path = Path(path)
    path.write_text(page)
    return path
