"""Checklist text for one prompt of every GenEval (and GenEval++) tag."""

import json
from pathlib import Path

import pytest

from reward.checklist import checklist_items, checklist_text, plural

DATA = Path(__file__).resolve().parents[2] / "data"

CASES = {
    "single_object": (
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        "1. The image contains at least one bench.",
    ),
    "two_object": (
        {
            "tag": "two_object",
            "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
        },
        "1. The image contains at least one bench.\n2. The image contains at least one sports ball.",
    ),
    "counting": (
        {
            "tag": "counting",
            "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}],
        },
        "1. The image contains exactly two clocks.",
    ),
    "colors": (
        {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}]},
        "1. The image contains at least one blue fire hydrant.",
    ),
    "position": (
        {
            "tag": "position",
            "include": [
                {"class": "teddy bear", "count": 1},
                {"class": "dog", "count": 1, "position": ["right of", 0]},
            ],
        },
        "1. The image contains at least one teddy bear.\n2. The image contains at least one dog.\n"
        "3. The dog is right of the teddy bear.",
    ),
    "color_attr": (
        {
            "tag": "color_attr",
            "include": [
                {"class": "wine glass", "count": 1, "color": "purple"},
                {"class": "apple", "count": 1, "color": "black"},
            ],
        },
        "1. The image contains at least one purple wine glass.\n2. The image contains at least one black apple.",
    ),
    "spatial_count_attr": (
        {
            "tag": "spatial_count_attr",
            "include": [
                {"class": "clock", "count": 3, "region": "left"},
                {"class": "cat", "count": 1, "region": "right"},
            ],
        },
        "1. The image contains at least three clocks, in the left part of the image.\n"
        "2. The image contains at least one cat, in the right part of the image.",
    ),
    "size_spatial_attr": (
        {
            "tag": "size_spatial_attr",
            "include": [
                {"class": "bench", "count": 1, "size": "larger", "region": "above"},
                {"class": "spoon", "count": 1, "size": "smaller", "region": "below"},
            ],
        },
        "1. The image contains at least one bench, in the upper part of the image.\n"
        "2. The bench is larger than the other objects.\n"
        "3. The image contains at least one spoon, in the lower part of the image.\n"
        "4. The spoon is smaller than the other objects.",
    ),
    "color_count_attr": (
        {
            "tag": "color_count_attr",
            "include": [
                {"class": "boat", "count": 3, "color": "white"},
                {"class": "hot dog", "count": 1, "color": "green"},
            ],
        },
        "1. The image contains at least three white boats.\n2. The image contains at least one green hot dog.",
    ),
}


@pytest.mark.parametrize("tag", sorted(CASES))
def test_checklist_text_per_tag(tag):
    metadata, expected = CASES[tag]
    assert checklist_text(metadata) == expected


def test_every_geneval_tag_is_covered_and_all_metadata_builds():
    path = DATA / "geneval" / "evaluation_metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert {r["tag"] for r in rows} <= set(CASES)
    for r in rows:
        assert checklist_items(r)


def test_exclude_without_matching_include_and_plurals():
    md = {
        "include": [{"class": "person", "count": 2}],
        "exclude": [{"class": "dog", "count": 1}, {"class": "knife", "count": 2}],
    }
    assert checklist_items(md) == [
        "The image contains at least two people.",
        "There is no dog in the image.",
        "There are fewer than two knives in the image.",
    ]
    assert [plural(w) for w in ("bus", "sandwich", "skis", "teddy bear", "cherry", "toy")] == [
        "buses",
        "sandwiches",
        "skis",
        "teddy bears",
        "cherries",
        "toys",
    ]


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"include": []},
        {"include": [{"count": 1}]},
        {"include": [{"class": "a", "position": ["left of", 3]}]},
    ],
)
def test_bad_metadata_raises(metadata):
    with pytest.raises(ValueError):
        checklist_items(metadata)
