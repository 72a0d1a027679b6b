"""What `learners.memory` measures about a process: the peak is the span's own, and freed large tensors leave.

Each check runs in a fresh Python process, so the allocator setting and the high-water mark belong to it alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

MB = 2**20


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_measured_span_peak_is_the_blocks_own_not_the_process_history():
    got = _run("""
        import json, torch
        from learners import memory
        big = torch.ones(300 * 2**20 // 4)  # 300 MB before the span: the process's old peak
        del big
        with memory.measured_span() as span:
            t = torch.ones(60 * 2**20 // 4)  # 60 MB inside
            del t
        print(json.dumps(span))
    """)
    assert got["peak_reset"] == 1.0
    assert 55 * MB < got["peak_growth_bytes"] < 120 * MB  # the 60 MB tensor, not the 300 MB one before the span


FRAGMENT = """
    import json, torch
    from learners import memory
    changed = memory.return_freed_memory_promptly() if SETTING else None
    warm = torch.ones(2**20)
    del warm  # one freed 4 MB block: glibc's dynamic threshold now serves 4 MB blocks from the heap
    base = memory.rss_bytes()
    held = [torch.ones(2**20) for _ in range(100)]  # 100 x 4 MB, the size of gathered parameters
    for i in range(0, 100, 2):
        held[i] = None  # every other one freed: holes in the heap if they came from it
    print(json.dumps({"changed": changed, "growth": memory.rss_bytes() - base}))
"""


def test_freed_large_tensors_are_returned_to_the_system_at_once():
    """With the setting RSS falls back to what is live (50 x 4 MB); with the C library's dynamic threshold
    the freed half stays resident (the control, so the test can tell the two apart)."""
    got = _run("SETTING = True\n" + textwrap.dedent(FRAGMENT))
    default = _run("SETTING = False\n" + textwrap.dedent(FRAGMENT))
    assert got["changed"] is True  # glibc here
    assert got["growth"] < 260 * MB  # 200 MB live plus little: the freed 200 MB went back
    assert default["growth"] > 350 * MB  # kept: the fragmentation the setting removes
