"""GenEval / TIIF loaders, prompt sources, the test-overlap filter and the checkpointable prompt iterator."""

import gzip
import json
from pathlib import Path

import pytest

from rollout.datasets import (
    PromptIterator,
    PromptRecord,
    balance_categories,
    cycle_categories,
    data_dir,
    known_prompt_sources,
    load_geneval,
    load_prompt_source,
    load_prompts,
    load_tiif,
    normalize_prompt,
    remove_overlap,
)

ROOT = Path(__file__).resolve().parents[2]
GENEVAL = ROOT / "data" / "geneval" / "evaluation_metadata.jsonl"
FIXTURES = ROOT / "tests" / "data"

GOOD = {
    "tag": "position",
    "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    "prompt": "a dog left of a cup",
}


def _write(tmp_path, lines):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_geneval_metadata_loads_with_tags():
    recs = load_geneval(GENEVAL)
    assert len(recs) == 553
    counts = {}
    for r in recs:
        counts[r.category] = counts.get(r.category, 0) + 1
    assert counts == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    assert recs[0].prompt == "a photo of a bench" and recs[0].metadata["include"] == [
        {"class": "bench", "count": 1}
    ]
    assert recs[0].source.endswith("evaluation_metadata.jsonl:1")


def test_geneval_plus_plus_keeps_extra_fields_and_auto_detects():
    recs = load_prompts(FIXTURES / "geneval_plus_plus_sample.jsonl")
    assert [r.category for r in recs] == ["color_attr", "size", "region"]
    assert recs[1].metadata["include"][0]["size"] == "large"
    assert recs[2].metadata["include"][0]["region"] == "top left"


def test_overlap_with_the_test_set_is_removed_whatever_the_case_and_period():
    test = load_geneval(GENEVAL)
    train = [PromptRecord("A photo of a Bench."), PromptRecord("a photo of a bench and a moon")]
    kept = remove_overlap(train, test)
    assert [r.prompt for r in kept] == ["a photo of a bench and a moon"]
    assert not {normalize_prompt(r.prompt) for r in kept} & {normalize_prompt(r.prompt) for r in test}


def test_tiif_loader_short_and_long():
    path = FIXTURES / "tiif_sample.jsonl"
    short = load_tiif(path)
    long = load_prompts(path, "tiif")
    assert len(short) == 3 and short[0].category == "2d_spatial_relation"
    assert short[0].prompt == "A red cup sits to the left of a blue book."
    assert len(short[0].metadata["yn_question_list"]) == len(short[0].metadata["yn_answer_list"])
    assert load_tiif(path, "long")[0].prompt == long[0].metadata["long_description"]
    assert load_prompts(path)[1].prompt == "A green umbrella and a yellow bicycle."  # auto-detected


def test_gzipped_jsonl_reads_like_the_plain_file(tmp_path):
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(GENEVAL.read_text(encoding="utf-8"))
    assert [r.prompt for r in load_prompts(gz)] == [r.prompt for r in load_geneval(GENEVAL)]


def test_prompt_sources_names_data_prefix_and_paths(tmp_path, monkeypatch):
    assert "geneval" in known_prompt_sources()
    assert len(load_prompt_source("geneval")) == 553
    (tmp_path / "mine").mkdir()
    _write(tmp_path / "mine", [GOOD])
    monkeypatch.setenv("R3RL_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    assert [r.prompt for r in load_prompt_source("data:mine/m.jsonl")] == ["a dog left of a cup"]
    assert [r.prompt for r in load_prompt_source(str(tmp_path / "mine" / "m.jsonl"))] == ["a dog left of a cup"]
    monkeypatch.delenv("R3RL_DATA")
    assert data_dir() == ROOT / "data"
    with pytest.raises(ValueError, match=r"'data:nope.jsonl'.*registered names: \[.*'geneval'"):
        load_prompt_source("data:nope.jsonl")


@pytest.mark.parametrize("spec", ["data:../secret.jsonl", "data:mine/../../secret.jsonl", "data:/etc/passwd",
                                  "data:mine/..", "data://host/x.jsonl"])
def test_data_specs_cannot_leave_the_data_folder(spec, tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "mine").mkdir(parents=True)
    _write(root / "mine", [GOOD])
    _write(tmp_path, [GOOD])  # tmp_path/m.jsonl exists outside the data folder
    (tmp_path / "secret.jsonl").write_text((tmp_path / "m.jsonl").read_text())
    monkeypatch.setenv("R3RL_DATA", str(root))
    with pytest.raises(ValueError) as e:
        load_prompt_source(spec)
    assert repr(spec) in str(e.value) and "without '..' parts" in str(e.value), str(e.value)
    assert [r.prompt for r in load_prompt_source("data:mine/m.jsonl")] == ["a dog left of a cup"]
    assert [r.prompt for r in load_prompt_source("data:./mine/m.jsonl")] == ["a dog left of a cup"]


def test_a_prompt_source_name_registers_once(monkeypatch):
    import rollout.datasets as ds

    monkeypatch.setattr(ds, "_SOURCES", dict(ds._SOURCES))
    ds.register_prompt_source("mine")(lambda: [PromptRecord("p")])
    assert [r.prompt for r in load_prompt_source("mine")] == ["p"]
    with pytest.raises(ValueError, match="'mine' is already registered"):
        ds.register_prompt_source("mine")(lambda: [])


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"tag": "x", "include": [{"class": "cup", "count": 1}]}, "'prompt'"),
        ({"tag": "x", "include": [], "prompt": "p"}, "'include'"),
        ({"tag": "x", "include": [{"count": 1}], "prompt": "p"}, r"include\[0\].class"),
        ({"tag": "x", "include": [{"class": "cup", "count": "two"}], "prompt": "p"}, "count"),
        (
            {"tag": "x", "include": [{"class": "cup", "count": 1, "position": ["left of"]}], "prompt": "p"},
            "position",
        ),
        (
            {
                "tag": "x",
                "include": [{"class": "cup", "count": 1, "position": ["left of", 5]}],
                "prompt": "p",
            },
            "another include",
        ),
        (
            {"tag": "x", "include": [{"class": "cup", "count": 1}], "exclude": {"a": 1}, "prompt": "p"},
            "'exclude'",
        ),
        ({"include": [{"class": "cup", "count": 1}], "prompt": "p"}, "'tag'"),
    ],
)
def test_malformed_geneval_line_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, "", GOOD, bad])
    with pytest.raises(ValueError, match=message) as err:
        load_geneval(path)
    assert f"{path}:4" in str(err.value)


def test_malformed_tiif_lines(tmp_path):
    row = {
        "type": "t",
        "short_description": "s",
        "long_description": "l",
        "yn_question_list": ["q?"],
        "yn_answer_list": ["yes"],
    }
    assert load_tiif(_write(tmp_path, [row]))[0].prompt == "s"
    for bad in (
        {**row, "yn_answer_list": ["maybe"]},
        {**row, "yn_answer_list": []},
        {**row, "short_description": ""},
    ):
        with pytest.raises(ValueError, match=":2:"):
            load_tiif(_write(tmp_path, [row, bad]))
    with pytest.raises(ValueError, match="description"):
        load_tiif(_write(tmp_path, [row]), "medium")


def test_overlap_filter_normalises_case_space_and_period():
    recs = [PromptRecord("A photo of  a Cat."), PromptRecord("a photo of a dog")]
    assert [r.prompt for r in remove_overlap(recs, ["a photo of a cat"])] == ["a photo of a dog"]


def test_iterator_is_seeded_and_covers_each_epoch():
    recs = [PromptRecord(f"p{i}") for i in range(7)]
    a, b = PromptIterator(recs, seed=3), PromptIterator(recs, seed=3)
    first = a.next_batch(7)
    assert sorted(r.prompt for r in first) == sorted(r.prompt for r in recs)
    assert first == b.next_batch(7)
    assert [r.prompt for r in PromptIterator(recs, seed=4).next_batch(7)] != [r.prompt for r in first]
    assert [r.prompt for r in PromptIterator(recs, shuffle=False).next_batch(3)] == ["p0", "p1", "p2"]
    a.next_batch(1)
    assert a.epoch == 1


def test_iterator_state_dict_resumes_exactly():
    recs = [PromptRecord(f"p{i}") for i in range(5)]
    it = PromptIterator(recs, seed=11)
    it.next_batch(3)
    state = json.loads(json.dumps(it.state_dict()))
    expected = [r.prompt for r in it.next_batch(9)]
    resumed = PromptIterator(recs, seed=11)
    resumed.load_state_dict(state)
    assert [r.prompt for r in resumed.next_batch(9)] == expected
    with pytest.raises(ValueError, match="num_records"):
        PromptIterator(recs[:4], seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptIterator(recs, seed=12).load_state_dict(state)


def test_balance_categories_cycles_small_categories_up_to_the_largest():
    recs = [PromptRecord(f"a{i}", category="a") for i in range(5)] + [
        PromptRecord("b0", category="b"), PromptRecord("b1", category="b"), PromptRecord("c0", category="c")
    ]
    out = [r.prompt for r in balance_categories(recs)]
    assert out == ["a0", "b0", "c0", "a1", "b1", "c0", "a2", "b0", "c0", "a3", "b1", "c0", "a4", "b0", "c0"]
    assert balance_categories([]) == []


def test_cycle_categories_gives_each_category_exactly_n_records():
    recs = [PromptRecord(f"a{i}", category="a") for i in range(5)] + [
        PromptRecord("b0", category="b"), PromptRecord("b1", category="b"), PromptRecord("c0", category="c")
    ]
    out = [r.prompt for r in cycle_categories(recs, 3)]
    assert out == ["a0", "b0", "c0", "a1", "b1", "c0", "a2", "b0", "c0"]  # a cut, b and c cycled
    with pytest.raises(ValueError, match="per_category=0"):
        cycle_categories(recs, 0)
