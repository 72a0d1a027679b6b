"""A self-contained HTML page of trajectories: per-round images, reflections, scores, stops.

Images are embedded as PNG data URLs, so the page is one file that opens anywhere (no server, no
side files). A small inline script reports, after the page has loaded, how many images decoded
(`#image-status`, attributes `data-decoded` / `data-total`), so a broken image is visible to a reader
and checkable by a headless browser.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from rollout.trajectory import Trajectory, png_bytes

__all__ = ["write_gallery", "render_gallery"]

_STYLE = """
body{font-family:sans-serif;margin:1.5em;background:#fafafa}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:6px;vertical-align:top;font-size:13px}
img{width:128px;height:128px;image-rendering:pixelated;display:block}
.stop{color:#b35c00;font-weight:bold}.ok{color:#1a7f37}.bad{color:#c62828}
.txt{max-width:220px;white-space:pre-wrap;word-break:break-word;font-family:monospace;font-size:11px}
#image-status{font-size:12px;color:#555}
"""

# Counts decoded images once everything has loaded (or failed to): naturalWidth is 0 for a broken image.
_STATUS_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.round-image'), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var s = document.getElementById('image-status');
  s.setAttribute('data-decoded', String(ok));
  s.setAttribute('data-total', String(imgs.length));
  s.textContent = ok + ' of ' + imgs.length + ' images decoded';
});
"""


def render_gallery(trajectories: Sequence[Trajectory], title: str = "R3RL trajectories") -> str:
    """The page as a string: one row per trajectory, one column per round (image, score, stop, text)."""
    max_rounds = max((len(t.rounds) for t in trajectories), default=0)
    head = "".join(f"<th>round {r}</th>" for r in range(max_rounds))
    rows = []
    for i, t in enumerate(trajectories):
        cells = [f"<td><b>{i}</b><br>{html.escape(t.prompt)}<br><small>{html.escape(str(t.metadata.get('tag', '')))}</small></td>"]
        for r in t.rounds:
            img = ""
            if r.image is not None:
                data = base64.b64encode(png_bytes(r.image.image)).decode()
                img = (f'<img class="round-image" data-trajectory="{i}" data-round="{r.index}" '
                       f'alt="trajectory {i} round {r.index}" src="data:image/png;base64,{data}">')
            verdict = '<span class="ok">correct</span>' if r.correct else '<span class="bad">wrong</span>'
            stop = '<div class="stop">stop: no further edit</div>' if r.stopped else ""
            text = html.escape(r.text.text) if r.text is not None else ""
            cells.append(
                f"<td>{img}<div>score {r.score:.3f} {verdict}</div>{stop}"
                f'<div class="txt">{text}</div></td>'
            )
        cells += ["<td></td>"] * (max_rounds - len(t.rounds))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(trajectories)} trajectories</p>"
        "<p id='image-status' data-decoded='' data-total=''>images not checked (scripts disabled)</p>"
        f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"
        f"<script>{_STATUS_SCRIPT}</script></body></html>"
    )


def write_gallery(path: str | Path, trajectories: Sequence[Trajectory], title: str = "R3RL trajectories") -> Path:
    """Write `path` (images embedded as data URLs, no external files) and return it."""
    path = Path(path)
    path.write_text(render_gallery(trajectories, title))
    return path
