"""The limits of what /increment takes, over HTTP, through both the inline fast path (one small object) and the array
path: each edge is accepted exactly at the limit and refused one past it, and what is refused counts nothing."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from fastcount.features.increment import MAX_KEY_BYTES, MAX_TOTAL, MAX_VALUE

from conftest import Database, StartServer, wait_until
from httpclient import request

BIG_BODY = "1048576"


def post(port: int, body: object) -> tuple[int, str]:
    status, _, answer = request(port, "POST", "/increment", body)
    return status, json.loads(answer)["error"] if answer else ""


def test_value_edges_on_the_fast_path_and_in_arrays(start_server: StartServer, database: Database, prefix: str) -> None:
    server = start_server("--flush-interval", "600")
    key = prefix + "v"
    assert MAX_VALUE == 2**53 - 1
    assert post(server.port, {"key": key, "value": MAX_VALUE}) == (202, "")  # the inline path
    assert post(server.port, [{"key": key, "value": MAX_VALUE}]) == (202, "")  # the array path
    for document in ({"key": key, "value": 2**53}, [{"key": key, "value": 2**53}], {"key": key, "value": 2**63}):
        status, error = post(server.port, document)
        assert (status, f"'value' must be from 1 to {MAX_VALUE}" in error) == (400, True), document
    for document in ({"key": key, "value": 0}, {"key": key, "value": -1}, [{"key": key, "value": 0}]):
        assert post(server.port, document)[0] == 400, document
    assert post(server.port, {"key": key, "value": 1}) == (202, "")
    assert server.stop() == 0
    assert database.counts(prefix) == {key: 2 * MAX_VALUE + 1}


@pytest.mark.parametrize("form", ["object", "array"])
def test_key_edges_count_bytes_of_utf8(start_server: StartServer, database: Database, prefix: str, form: str) -> None:
    server = start_server("--flush-interval", "600")
    ascii_key = prefix + "a" * (MAX_KEY_BYTES - len(prefix))
    room = MAX_KEY_BYTES - len(prefix)
    multibyte_key = prefix + "é" * (room // 2) + "x" * (room % 2)
    four_byte_key = prefix + "x" * (room % 4) + "𝄞" * (room // 4)
    accepted = [ascii_key, multibyte_key, four_byte_key]
    assert [len(key.encode()) for key in accepted] == [MAX_KEY_BYTES] * 3
    refused = [ascii_key + "a", multibyte_key + "x", four_byte_key + "x"]
    assert [len(key.encode()) for key in refused] == [MAX_KEY_BYTES + 1] * 3
    refused += [multibyte_key + "é", "é" * (MAX_KEY_BYTES // 2 + 1)]

    def body(key: str) -> object:
        item = {"key": key, "value": 3}
        return item if form == "object" else [item]

    for key in accepted:
        assert post(server.port, body(key)) == (202, ""), key
    for key in [*refused, ""]:
        status, error = post(server.port, body(key))
        assert (status, "'key' must be 1 to 256 bytes of UTF-8" in error) == (400, True), key
    assert server.stop() == 0
    assert database.counts(prefix) == dict.fromkeys(accepted, 3)


@pytest.mark.parametrize("form", ["object", "array"])
def test_nul_in_a_key_is_refused_with_400(
    start_server: StartServer, database: Database, prefix: str, form: str
) -> None:
    server = start_server("--flush-interval", "600")
    for key in (prefix + "\x00", "\x00" + prefix, prefix + "a\x00b"):
        item = {"key": key, "value": 1}
        status, error = post(server.port, item if form == "object" else [{"key": prefix + "ok", "value": 1}, item])
        assert status == 400 and "NUL" in error, key
    assert server.stop() == 0
    assert database.counts(prefix) == {}, "nothing of a refused request is counted"


def test_a_sum_past_the_bigint_range_is_refused_within_an_array_and_against_pending(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server("--flush-interval", "600", "--max-body", BIG_BODY)
    key, other = prefix + "big", prefix + "other"
    # 1,024 times 2^53-1 is 2^63-1024: the largest whole array of maximal values a counter can still hold.
    fits = [{"key": key, "value": MAX_VALUE}] * 1024
    over = [*fits, {"key": key, "value": MAX_VALUE}]
    assert sum(item["value"] for item in fits) <= MAX_TOTAL < sum(item["value"] for item in over)  # type: ignore[misc]
    status, error = post(server.port, [{"key": other, "value": 1}, *over])
    assert status == 400 and "would pass" in error
    assert post(server.port, fits) == (202, "")
    # Pending now holds 2^63-1024 for the key: one more maximal value would pass the range, by either path.
    assert post(server.port, {"key": key, "value": MAX_VALUE})[0] == 400
    assert post(server.port, [{"key": key, "value": MAX_VALUE}])[0] == 400
    assert post(server.port, {"key": key, "value": 1023}) == (202, "")  # exactly 2^63-1
    assert post(server.port, {"key": key, "value": 1})[0] == 400
    assert server.stop() == 0
    assert database.counts(prefix) == {key: MAX_TOTAL}


def test_reading_a_counter_takes_the_same_keys_as_counting_it(start_server: StartServer, prefix: str) -> None:
    server = start_server()
    room = MAX_KEY_BYTES - len(prefix)
    longest = prefix + "é" * (room // 2) + "x" * (room % 2)
    assert post(server.port, {"key": longest, "value": 7}) == (202, "")

    def read(key: str) -> tuple[int, bytes]:
        status, _, body = request(server.port, "GET", "/counters/" + urllib.parse.quote(key, safe=""))
        return status, body

    wait_until(lambda: read(longest)[0] == 200, "the 256-byte key is flushed and readable")
    assert json.loads(read(longest)[1])["value"] == 7
    for refused in (longest + "x", ""):
        status, body = read(refused)
        assert status == 400 and b"1 to 256 bytes" in body, refused
    status, _, body = request(server.port, "GET", "/counters/%FF")
    assert status == 400 and b"UTF-8" in body
    assert read(prefix + "never")[0] == 404
