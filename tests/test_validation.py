"""parse_increments: every rule of the POST /increment body, without a server."""

from __future__ import annotations

import json

import pytest

from fastcount.features.increment import MAX_ITEMS, MAX_VALUE, InvalidIncrement, parse_increments


def body(document: object) -> bytes:
    return json.dumps(document).encode()


def test_single_object_is_one_increment() -> None:
    assert parse_increments(body({"key": "a", "value": 5})) == [("a", 5)]


def test_unknown_fields_are_ignored() -> None:
    assert parse_increments(body({"key": "a", "value": 1, "note": "x"})) == [("a", 1)]


def test_array_gives_every_item_in_order() -> None:
    items = [{"key": "a", "value": 1}, {"key": "b", "value": 2}, {"key": "a", "value": 3}]
    assert parse_increments(body(items)) == [("a", 1), ("b", 2), ("a", 3)]


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"value": 1}, "'key' is required"),
        ({"key": "a"}, "'value' is required"),
        ({"key": 5, "value": 1}, "'key' must be a string"),
        ({"key": "", "value": 1}, "1 to 256 bytes"),
        ({"key": "é" * 129, "value": 1}, "1 to 256 bytes"),  # 258 bytes of UTF-8 in 129 characters
        ({"key": "a", "value": 0}, "from 1 to"),
        ({"key": "a", "value": -3}, "from 1 to"),
        ({"key": "a", "value": MAX_VALUE + 1}, "from 1 to"),
        ({"key": "a", "value": 1.0}, "must be an integer"),
        ({"key": "a", "value": "1"}, "must be an integer"),
        ({"key": "a", "value": True}, "must be an integer"),
        ({"key": "a", "value": None}, "'value' is required"),
        ("just a string", "must be an object"),
        ([], "at least one"),
        ([{"key": "a", "value": 1}, {"key": "b", "value": 0}], "item 1: 'value'"),
    ],
)
def test_invalid_bodies_name_the_problem(document: object, problem: str) -> None:
    with pytest.raises(InvalidIncrement, match=problem):
        parse_increments(body(document))


def test_key_limit_counts_bytes_not_characters() -> None:
    assert parse_increments(body({"key": "é" * 128, "value": 1})) == [("é" * 128, 1)]  # exactly 256 bytes
    assert parse_increments(body({"key": "k" * 256, "value": MAX_VALUE})) == [("k" * 256, MAX_VALUE)]


def test_not_json_is_rejected() -> None:
    with pytest.raises(InvalidIncrement, match="JSON"):
        parse_increments(b'{"key": "a", "value": 1')


def test_array_larger_than_limit_is_rejected() -> None:
    with pytest.raises(InvalidIncrement, match="more than"):
        parse_increments(body([{"key": "a", "value": 1}] * (MAX_ITEMS + 1)))
