"""The evaluation gallery renders in a real browser: headless Chromium (Debian's `chromium`).

The page is written by `cluster.gallery.write_gallery` from the same `Trajectory` records the driver
passes after an evaluation. Chromium takes a screenshot (each embedded image's colour must appear as a
128x128 block, in its row and column) and dumps the DOM after load (the page's own script counts the
images whose `naturalWidth > 0`). A page with one corrupted data URL must fail both checks.

Chromium is installed by this module when missing (`apt-get install chromium`, as root; about 20 s
here including `apt-get update`, 25 packages, 113 MB). Without root or apt the module fails with a
message instead of skipping, so CI never silently drops the check.
"""

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.gallery import write_gallery
from rollout.trajectory import ImageSample, Round, TextSample, Trajectory

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

# Distinct colours, one per (trajectory, round); row = trajectory, column = round.
COLOURS = [[(230, 25, 75), (60, 180, 75), (0, 130, 200)], [(255, 225, 25), (145, 30, 180), (70, 240, 240)]]
IMAGE_CSS_PX = 128  # cluster.gallery draws every image at 128x128
WINDOW = (1400, 1000)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of Debian's chromium, installed with apt-get when missing (bounded, logged)."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("the gallery test needs Debian's `chromium`: it is not installed and cannot be installed here "
                    "(needs root and apt-get). Install it with `apt-get install -y chromium`.")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    start = time.monotonic()
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=300, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or shutil.which("chromium") is None:
        pytest.fail(f"`apt-get install chromium` failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
    log.warning("installed chromium in %.1f s", time.monotonic() - start)
    return shutil.which("chromium")


def _trajectories() -> list[Trajectory]:
    """Two evaluation trajectories of three rounds, the last one stopping (as `evaluate` returns them)."""
    out = []
    for i, row in enumerate(COLOURS):
        rounds = []
        for r, colour in enumerate(row):
            img = np.empty((32, 32, 3), np.uint8)
            img[:] = colour
            text = TextSample([1, 2], [3, 4], [-0.5, -0.25], f"reflection {i}.{r}: make the <circle> bigger")
            rounds.append(Round(r, "eval", text=text, image=ImageSample(img, f"prompt {i}", seed=r, noise_level=0.0),
                                score=0.25 * r, correct=r == 2, stopped=r == 2))
        out.append(Trajectory(f"a photo of object {i}", {"tag": "counting"}, group_id=i, rounds=rounds))
    return out


def _browse(chromium: str, page: Path, tmp: Path) -> tuple[str, np.ndarray]:
    """(DOM after load, screenshot as (H, W, 3) uint8) of `page` in headless Chromium."""
    from PIL import Image

    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp / 'profile'}", "--force-device-scale-factor=1"]
    shot = tmp / f"{page.stem}.png"
    subprocess.run([*common, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return dom, np.asarray(Image.open(shot).convert("RGB"))


def _decoded(dom: str) -> tuple[int, int]:
    m = re.search(r'id="image-status" data-decoded="(\d+)" data-total="(\d+)"', dom)
    assert m, f"no image status in the DOM (did the page's script run?): {dom[:500]}"
    return int(m.group(1)), int(m.group(2))


def _blocks(shot: np.ndarray) -> dict[tuple[int, int], tuple[int, float, float]]:
    """Per (trajectory, round): (pixels of its colour, centre x, centre y) in the screenshot."""
    out = {}
    for i, row in enumerate(COLOURS):
        for r, colour in enumerate(row):
            mask = np.abs(shot.astype(int) - np.array(colour)).max(axis=-1) <= 6
            ys, xs = np.nonzero(mask)
            out[(i, r)] = (int(mask.sum()), float(xs.mean()) if len(xs) else -1.0, float(ys.mean()) if len(ys) else -1.0)
    return out


def test_gallery_images_render_in_headless_chromium(chromium, tmp_path):
    page = write_gallery(tmp_path / "gallery.html", _trajectories(), title="R3RL evaluation (test)")
    dom, shot = _browse(chromium, page, tmp_path)
    assert _decoded(dom) == (6, 6)
    assert dom.count('class="round-image"') == 6
    for text in ("reflection 0.1: make the &lt;circle&gt; bigger", "stop: no further edit", "score 0.500",
                 "a photo of object 1"):
        assert text in dom
    blocks = _blocks(shot)
    full = IMAGE_CSS_PX * IMAGE_CSS_PX
    for key, (count, _, _) in blocks.items():
        assert 0.9 * full <= count <= 1.1 * full, (key, count)  # each image drawn once, at 128x128
    for i in range(2):  # rounds left to right within a row, trajectories top to bottom
        xs = [blocks[(i, r)][1] for r in range(3)]
        assert xs == sorted(xs) and xs[1] - xs[0] >= IMAGE_CSS_PX, xs
    for r in range(3):
        assert blocks[(1, r)][2] - blocks[(0, r)][2] >= IMAGE_CSS_PX
    background = (np.abs(shot.astype(int) - 250).max(axis=-1) <= 3).mean()
    assert background < 0.95  # the page is not blank


def test_gallery_check_catches_a_corrupted_image(chromium, tmp_path):
    page = write_gallery(tmp_path / "broken.html", _trajectories())
    html = page.read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    end = html.index('"', start)
    page.write_text(html[:start] + html[start:start + 40] + html[end:])  # the first PNG cut after its header
    dom, shot = _browse(chromium, page, tmp_path)
    assert _decoded(dom) == (5, 6)
    assert _blocks(shot)[(0, 0)][0] == 0  # the corrupted image's colour never appears
    assert _blocks(shot)[(1, 2)][0] >= 0.9 * IMAGE_CSS_PX**2
