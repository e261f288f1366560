"""The HTTP surface of a real server over real sockets: answers, limits, reads and health."""

from __future__ import annotations

import json
import time
import urllib.parse

from conftest import Database, StartServer, wait_until
from httpclient import raw, request, statuses


def test_increment_answers_202_with_an_empty_body(start_server: StartServer, prefix: str) -> None:
    server = start_server()
    status, headers, body = request(server.port, "POST", "/increment", {"key": prefix + "a", "value": 1})
    assert (status, body) == (202, b"")
    assert headers["Content-Length"] == "0"
    assert "Date" in headers


def test_invalid_increment_gets_400_naming_the_problem_and_counts_nothing(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server()
    for document, problem in [
        ({"key": prefix + "a", "value": 0}, "'value' must be from 1"),
        ({"key": prefix + "a", "value": 1.5}, "'value' must be an integer"),
        ({"key": prefix + "a", "value": True}, "'value' must be an integer"),
        ({"key": prefix + "a", "value": 10**26}, "'value' must be an integer from 1 to 9007199254740991"),
        ({"value": 1}, "'key' is required"),
        ([{"key": prefix + "a", "value": 1}, {"key": prefix + "b", "value": -1}], "item 1"),
    ]:
        status, headers, body = request(server.port, "POST", "/increment", document)
        assert status == 400
        assert headers["Content-Type"] == "application/json"
        assert problem in json.loads(body)["error"]
    status, _, body = request(server.port, "POST", "/increment", b"{not json")
    assert status == 400 and b"JSON" in body
    status, _, body = request(server.port, "POST", "/increment", b'{"key": "\xff", "value": 1}')
    assert (status, json.loads(body)["error"]) == (400, "body must be JSON (not valid UTF-8)")
    server.stop()
    assert database.total(prefix) == 0


def test_limits_and_routing_answers(start_server: StartServer) -> None:
    server = start_server()
    assert statuses(raw(server.port, b"GARBAGE\r\n\r\n")) == [400]
    assert statuses(raw(server.port, b"GET /healthz HTTP/1.1\r\nX: " + b"x" * 9000 + b"\r\n\r\n")) == [431]
    big = b"x" * 70_000
    answer = raw(server.port, b"POST /increment HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
    assert statuses(answer) == [413]
    assert request(server.port, "GET", "/nowhere")[0] == 404
    status, headers, _ = request(server.port, "GET", "/increment")
    assert status == 405 and headers["Allow"] == "POST"


def test_pipelined_requests_answered_in_order_including_a_database_read(
    start_server: StartServer, database: Database, prefix: str
) -> None:
    server = start_server()
    key = prefix + "pipe"
    assert request(server.port, "POST", "/increment", {"key": key, "value": 7})[0] == 202
    wait_until(lambda: database.counts(prefix) == {key: 7}, "the first increment is flushed")
    inc = json.dumps({"key": key, "value": 1}).encode()
    post = b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(inc) + inc
    read = b"GET /counters/" + urllib.parse.quote(key).encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw(server.port, post + read + post + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + post, wait=1.0)
    assert statuses(answer) == [202, 200, 202, 404, 202]
    assert b'"value":7' in answer or b'"value":8' in answer  # the read races the next flush, by design


def test_request_split_into_tiny_writes_is_parsed(start_server: StartServer, database: Database, prefix: str) -> None:
    server = start_server()
    body = json.dumps({"key": prefix + "slow", "value": 3}).encode()
    data = b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    assert statuses(raw(server.port, data, chunks=[data[i : i + 3] for i in range(0, len(data), 3)])) == [202]
    server.stop()
    assert database.total(prefix) == 3


def test_expect_continue_chunked_and_http10(start_server: StartServer, database: Database, prefix: str) -> None:
    server = start_server()
    body = json.dumps({"key": prefix + "x", "value": 2}).encode()
    expect = b"POST /increment HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    answer = raw(server.port, b"", chunks=[expect, body])
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\n")
    chunked = b"POST /increment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    assert statuses(raw(server.port, chunked)) == [202]
    http10 = b"POST /increment HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    answer = raw(server.port, http10, wait=2.0)
    assert statuses(answer) == [202] and b"Connection: close" in answer  # and the server closed: raw returned
    server.stop()
    assert database.total(prefix) == 6


def test_read_counter_and_health(start_server: StartServer, prefix: str) -> None:
    server = start_server()
    key = prefix + "a b/ü"
    request(server.port, "POST", "/increment", {"key": key, "value": 41})
    request(server.port, "POST", "/increment", {"key": key, "value": 1})
    deadline = time.monotonic() + 5
    while True:  # a flush may fall between the two requests, so the first read may hold only the first: wait for both
        status, _, body = request(server.port, "GET", "/counters/" + urllib.parse.quote(key, safe=""))
        if (status == 200 and json.loads(body)["value"] == 42) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    document = json.loads(body)
    assert (status, document["key"], document["value"]) == (200, key, 42)
    assert "updated_at" in document
    assert request(server.port, "GET", "/counters/" + prefix + "never")[0] == 404
    assert request(server.port, "GET", "/healthz")[0] == 200
    assert request(server.port, "GET", "/readyz")[0] == 200
    for path in ("/healthz", "/readyz"):  # load balancers may check with HEAD: the same answer, no body
        assert request(server.port, "HEAD", path)[::2] == (200, b"")
    # HEAD wherever a GET only reads (RFC 9110 9.3.2): the same status and headers, no body.
    status, headers, body = request(server.port, "HEAD", "/counters/" + urllib.parse.quote(key, safe=""))
    assert (status, body, headers["Content-Type"]) == (200, b"", "application/json")
    assert request(server.port, "HEAD", "/counters/" + prefix + "never")[::2] == (404, b"")
    # ... but not where a GET records something: HEAD /api/verve/accept?id=1 would count the id
    status, headers, _ = request(server.port, "HEAD", "/api/verve/accept?id=1")
    assert (status, headers["Allow"]) == (405, "GET")
