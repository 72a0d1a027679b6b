"""Documentation references resolve, and the repository speaks of the product.

- Every `docs/<file>.md` reference (with or without `#<anchor>`) in code, configs, tests, benchmarks,
  examples and docs names a file that exists and, with an anchor, a heading of that file.
- Every relative markdown link `[text](path#anchor)` in README.md, docs/ and the examples' READMEs
  names a path that exists and, with an anchor into a markdown file, one of its headings.
- Anchors are GitHub's: the heading's text in lower case, punctuation dropped, each space a '-',
  and a repeated heading's anchor suffixed `-1`, `-2`, ... (headings inside code fences do not count).
- No file cites design notes that are not in the repository, or paths beside the checkout.
- No tracked text file speaks of how it was made: work-session or issue numbers, or the
  machine it was written on.

Pure file reading; no package of the project is imported.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = (
    "actors",
    "learners",
    "rollout",
    "reward",
    "cluster",
    "examples",
    "tests",
    "bench",
    "configs",
    "docs",
)
TOP_FILES = ("README.md", "Makefile")
SUFFIXES = {".py", ".yaml", ".yml", ".md"}
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".venv", ".git"}

# A root-relative `docs/<file>.md[#anchor]`; not the tail of a longer path (`../docs/...` is a link).
DOC_REF = re.compile(r"(?<![\w./-])(docs/(?:[\w.-]+/)*[\w.-]+\.md)(?:#([\w-]*))?")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
HTML_ID = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")

# Built from pieces, so that this file does not itself mention what it forbids.
FORBIDDEN = ("DESIGN" + ".md", "RECIPES" + ".md", "/work" + "/shared", ".." + "/shared")
HISTORY = re.compile(r"(?i)\bsession[ -]?\d|\bthis\s+box\b|\bissue[ ]#?\d+")


def scanned_files() -> list[Path]:
    """The .py/.yaml/.md files and Makefiles under `TREES`, plus README.md and the root Makefile."""
    out = [ROOT / name for name in TOP_FILES if (ROOT / name).is_file()]
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            if SKIP_DIRS.isdisjoint(path.relative_to(ROOT).parts) and path.is_file():
                if path.suffix in SUFFIXES or path.name == "Makefile":
                    out.append(path)
    return out


def markdown_with_links() -> list[Path]:
    """README.md, every markdown file under docs/, and every README.md under examples/."""
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "examples").rglob("README.md")),
    ]


def slugify(text: str) -> str:
    """GitHub's anchor of a heading's text, before the duplicate suffix."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def unfenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
        elif fence is None:
            out.append((number, line))
    return out


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every anchor of a markdown file: its headings' (with GitHub's `-N` suffixes) and HTML ids."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in unfenced_lines(path.read_text()):
        found.update(HTML_ID.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug = slugify(m.group(1))
        while slug in seen:  # github-slugger's rule
            seen[base] += 1
            slug = f"{base}-{seen[base]}"
        seen[slug] = 0
        found.add(slug)
    return frozenset(found)


def check_target(target: Path, anchor: str | None) -> str | None:
    """Why `target#anchor` is broken, or None."""
    if not target.exists():
        return "no such file"
    if anchor and target.suffix == ".md" and anchor not in anchors(target.resolve()):
        return f"no heading with anchor #{anchor}"
    return None


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_slugs_follow_github():
    assert slugify("Answers and the stop phrase") == "answers-and-the-stop-phrase"
    assert slugify("### `models.reasoner`".lstrip("# ")) == "modelsreasoner"
    assert slugify("v9: twice the flow updates") == "v9-twice-the-flow-updates"
    assert slugify("From v8 with SDE noise 1.5") == "from-v8-with-sde-noise-15"
    assert slugify("`cluster.text_workers`") == "clustertext_workers"
    assert slugify("See [the guide](x.md) – now") == "see-the-guide--now"


def test_anchors_of_repeated_headings_and_code_fences(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("# A\n## Notes\n```bash\n# not a heading\n```\n## Notes\n### Notes\n## Notes-1 ##\n")
    assert anchors(doc) == {"a", "notes", "notes-1", "notes-2", "notes-1-1"}


def test_doc_references_resolve():
    broken = set()
    for path in scanned_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for m in DOC_REF.finditer(line):
                why = check_target(ROOT / m.group(1), m.group(2))
                if why:
                    broken.add(f"{rel(path)}:{number}: {m.group(0)} ({why})")
    assert not broken, "broken docs/ references:\n" + "\n".join(sorted(broken))


def test_markdown_links_resolve():
    broken = []
    for path in markdown_with_links():
        for number, line in unfenced_lines(path.read_text()):
            for m in MD_LINK.finditer(re.sub(r"`[^`]*`", "", line)):
                link = m.group(1)
                if not link or re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", link) or link.startswith("//"):
                    continue  # a URL or mail address
                file_part, _, anchor = link.partition("#")
                target = (path.parent / file_part) if file_part else path
                why = check_target(target, anchor or None)
                if why:
                    broken.append(f"{rel(path)}:{number}: ({link}) ({why})")
    assert not broken, "broken markdown links:\n" + "\n".join(broken)


def test_no_references_to_notes_outside_the_repository():
    hits = [
        f"{rel(path)}:{number}: {word}"
        for path in scanned_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for word in FORBIDDEN
        if word in line
    ]
    assert not hits, "references to files that are not in the repository:\n" + "\n".join(hits)


def is_text_source(path: Path) -> bool:
    """A .py/.md/.yaml/.toml file, a Makefile or the CI script (`path` relative to the root)."""
    return path.suffix in {*SUFFIXES, ".toml"} or path.name == "Makefile" or path.parts == (".ci", "run")


def tracked_text_files() -> list[Path]:
    """The text files git tracks (or would: untracked, not ignored); a walk where there is no git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, text=True,
        ).stdout.split("\0")  # fmt: skip
        paths = [ROOT / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):  # a copy of the checkout without .git
        ignored = SKIP_DIRS | {"runs", ".stamps", ".cache", "build", "dist"}
        paths = [
            p for p in ROOT.rglob("*")
            if ignored.isdisjoint(p.relative_to(ROOT).parts) and not p.relative_to(ROOT).is_relative_to("bench/results")
            and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
        ]  # fmt: skip
    return sorted(p for p in paths if p.is_file() and is_text_source(p.relative_to(ROOT)))


def test_no_development_history_in_the_tree():
    hits = [
        f"{rel(path)}:{number}: {line.strip()[:120]}"
        for path in tracked_text_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert not hits, "development-history language:\n" + "\n".join(hits)
