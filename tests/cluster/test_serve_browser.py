"""The web page of the inference app in a real browser: headless Chromium (Debian's `chromium`) loads `/`,
submits a prompt, and the page shows the rounds as they stream in: decoded images, plan text, scores.

Chromium is driven over the DevTools protocol (aiohttp's websocket client, a Ray dependency). The
session fixture installs Chromium with apt-get when it is missing, and fails, naming the command,
when it cannot. The screenshot is kept in the test's tmp folder (`page.png`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.serve_app import running_app

pytestmark = pytest.mark.integration

PAGE_WAIT_S = 600  # upper bound on the wait for the rounds (a bound, not a timing assertion)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a headless-capable Chromium; installed from Debian packages when missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    install = "apt-get update && apt-get install -y chromium"
    if os.geteuid() != 0:
        pytest.fail(f"chromium is not installed and this user cannot install it; run as root: {install}")
    result = subprocess.run(["bash", "-c", install], capture_output=True, text=True, timeout=900)
    found = shutil.which("chromium")
    if result.returncode != 0 or not found:
        pytest.fail(f"could not install chromium ({install}, exit {result.returncode}): {result.stderr[-2000:]}")
    return found


@pytest.fixture(scope="module")
def url():
    with running_app() as base:
        yield base


class DevTools:
    """A minimal DevTools-protocol client for one page target."""

    def __init__(self, ws: Any):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + PAGE_WAIT_S
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        raise AssertionError(f"the page never showed {what} within {PAGE_WAIT_S} s")


def _devtools_port(profile: Path, proc: subprocess.Popen) -> int:
    marker = profile / "DevToolsActivePort"
    for _ in range(600):
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text().splitlines()[0])
        if proc.poll() is not None:
            raise AssertionError(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError("chromium did not open its DevTools port")


async def _drive(port: int, page_url: str, shot: Path) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = [t for t in await resp.json() if t["type"] == "page"]
        async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            dt = DevTools(ws)
            await dt.call("Page.enable")
            await dt.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                          mobile=False)
            await dt.call("Page.navigate", url=page_url)
            await dt.wait_for("document.readyState === 'complete' && !!document.getElementById('prompt')", "the form")
            await dt.evaluate("""(() => {
                document.getElementById('prompt').value = 'a red <b>cube</b> left of a blue sphere';
                document.getElementById('rounds').value = '2';
                document.getElementById('run').click();
                return true; })()""")
            state = await dt.wait_for(
                "['done', 'error'].includes(document.getElementById('status').dataset.state) && "
                "document.getElementById('status').dataset.state", "a finished request")
            info = await dt.evaluate("""(() => {
                const imgs = [...document.querySelectorAll('img.round-image')];
                const first = imgs[0] ? imgs[0].getBoundingClientRect() : null;
                return {
                  rounds: document.querySelectorAll('.round').length,
                  decoded: imgs.filter(i => i.complete && i.naturalWidth === 64).length,
                  texts: [...document.querySelectorAll('.round-text')].map(e => e.textContent),
                  status: document.getElementById('status').textContent,
                  bold: document.querySelectorAll('b').length,
                  box: first && {x: first.x, y: first.y, w: first.width, h: first.height},
                  dom: document.documentElement.outerHTML };
              })()""")
            shot.write_bytes(base64.b64decode((await dt.call("Page.captureScreenshot"))["data"]))
            return {**info, "state": state}


def test_page_submits_a_prompt_and_shows_the_rounds(chromium, url, tmp_path):
    import numpy as np
    from PIL import Image

    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        shot = tmp_path / "page.png"
        info = asyncio.run(_drive(_devtools_port(profile, proc), f"{url}/", shot))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert info["state"] == "done", info["status"]
    assert 1 <= info["rounds"] <= 2 and info["decoded"] >= 1, info
    assert info["texts"] and all(isinstance(t, str) for t in info["texts"])
    assert "<b>cube</b>" in info["status"] and info["bold"] == 0  # the echoed prompt is shown as text, not HTML
    assert 'class="round-image"' in info["dom"] and "data:image/png;base64," in info["dom"]
    # the screenshot shows the first round's image: its box holds many colours, not the page background
    screen = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    b = info["box"]
    crop = screen[int(b["y"]) + 2:int(b["y"] + b["h"]) - 2, int(b["x"]) + 2:int(b["x"] + b["w"]) - 2]
    assert crop.size and len(np.unique(crop.reshape(-1, 3), axis=0)) > 16, "the image area of the screenshot is blank"
