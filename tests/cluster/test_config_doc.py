"""docs/config.md is generated from the config schema: every field documented, the file current."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from cluster.config import R3Config
from cluster.config_doc import DEFAULT_PATH, main, render

ROOT = Path(__file__).resolve().parents[2]


def _fields(model: type[BaseModel], prefix: str = ""):
    """(key path, FieldInfo) of every field, sections and their fields alike."""
    for name, info in model.model_fields.items():
        yield prefix + name, info
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _fields(info.annotation, f"{prefix}{name}.")


def test_every_config_field_has_a_description():
    missing = [path for path, info in _fields(R3Config) if not (info.description or "").strip()]
    assert not missing, f"give these config fields Field(description=...) in cluster/config.py: {missing}"


def test_docs_config_md_is_current():
    path = ROOT / "docs" / "config.md"
    assert path == DEFAULT_PATH
    assert path.is_file() and path.read_text() == render(), (
        "docs/config.md is stale: run `make docs` (python -m cluster.config_doc)"
    )


def test_reference_lists_every_leaf_key_with_its_constraints():
    text = render()
    leaves = [p for p, info in _fields(R3Config)
              if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))]
    assert all(f"| `{p}` |" in text for p in leaves)
    assert "| `r3.max_rounds` | int | `4` | >= 1, <= 16 |" in text
    assert '| `r3.mode` | str | `"tree"` | `"tree"`, `"chain"` |' in text
    assert "| `data.limit` | int or null | `null` | >= 1 |" in text


def test_check_reports_a_stale_file_and_write_fixes_it(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert main(["--check", "--out", str(out)]) == 1
    assert "make docs" in capsys.readouterr().err
    assert main(["--out", str(out)]) == 0
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert main(["--check", "--out", str(out)]) == 1


def test_a_field_without_description_is_refused():
    class Bad(BaseModel):
        value: int = 1

    class Root(BaseModel):
        section: Bad = Bad()

    with pytest.raises(ValueError, match="section"):
        render(Root)
