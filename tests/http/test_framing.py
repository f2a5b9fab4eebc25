"""The request parser's framing decisions, fuzzed (hypothesis) on the real server: a request
with a body, then a second request on the same connection. Every input is either refused with
one 400 (the connection then closed, the app having seen nothing) or served with exactly one
framing — ``Transfer-Encoding: chunked``, else ``Content-Length``, else no body — so the
second request is read where that framing ends and nowhere else (no desync, no smuggling).

The expected outcome comes from a strict reading of RFC 9112 written out below: CRLF line
ends only, no obs-fold, no space before a colon, one Content-Length of digits, one
Transfer-Encoding whose last coding is chunked, never both."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http.test_server import Running, closed_by_peer, connect, echo, read_response, serve

SECOND = b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"

#: Content-Length renderings of n, and whether a strict reader takes them as n.
CL_FORMS = [
    ("{n}", True),
    ("{n} ", True),
    (" {n}", True),
    ("+{n}", False),
    ("-{n}", False),
    ("{n}, {n}", False),
    ("", False),
    ("0x{n}", False),
    ("{n}a", False),
]
#: Transfer-Encoding values (repeated ones make one list, RFC 9110 §5.3); framed as chunked
#: when chunked is the last coding and appears once, else refused.
TE_FORMS = [
    "chunked",
    "Chunked",
    "gzip, chunked",
    "chunked, gzip",
    "identity",
    "xchunked",
    "chunked, chunked",
]


@dataclass
class Case:
    wire: bytes
    refused: bool
    body: bytes  # what the app must see as the first request's body when served


@st.composite
def cases(draw: st.DrawFn) -> Case:
    payload = draw(st.binary(min_size=1, max_size=24))
    cls = draw(st.lists(st.sampled_from(CL_FORMS), max_size=2))
    tes = draw(st.lists(st.sampled_from(TE_FORMS), max_size=2))
    if not cls and not tes:
        payload = b""  # no framing header: no body (bytes after the head are the next request)
    lines: list[tuple[bytes, bool]] = [(b"Host: a", True), (b"X-Filler: 1", True)]
    lines += [(f"Content-Length: {form.format(n=len(payload))}".encode(), ok) for form, ok in cls]
    lines += [(f"Transfer-Encoding: {form}".encode(), True) for form in tes]
    order = draw(st.permutations(range(len(lines))))
    lines = [lines[i] for i in order]
    codings = [
        c.strip().lower()
        for line, _ in lines
        if line.startswith(b"Transfer-Encoding:")
        for c in line.decode().partition(":")[2].split(",")
    ]
    refused = (
        len(cls) > 1
        or (bool(cls) and bool(tes))
        or not all(ok for _, ok in lines)
        or (bool(tes) and (codings[-1] != "chunked" or codings.count("chunked") > 1))
    )
    head = [b"POST /first HTTP/1.1"] + [line for line, _ in lines]
    # Damage one line of the head, maybe: each of these a strict reader refuses.
    damage = draw(st.sampled_from(["none", "none", "bare-lf", "obs-fold", "space-colon"]))
    if damage != "none":
        at = draw(st.integers(min_value=1, max_value=len(head) - 1))
        if damage == "bare-lf":
            head[at] = (
                head[at] + b"\n" + head.pop(at + 1)
                if at + 1 < len(head)
                else head[at] + b"\nX-Late: 1"
            )
        elif damage == "obs-fold":
            head.insert(at + 1, b" folded")
        else:
            name, _, value = head[at].partition(b":")
            head[at] = name + b" :" + value
        refused = True
    wire = b"\r\n".join(head) + b"\r\n\r\n"
    if tes:
        bad_chunk = draw(st.booleans()) and draw(st.booleans())  # a quarter of them
        split = draw(st.integers(min_value=0, max_value=len(payload)))
        nl = b"\n" if bad_chunk else b"\r\n"
        for part in (payload[:split], payload[split:]):
            if part:
                wire += b"%x" % len(part) + nl + part + b"\r\n"
        wire += b"0" + nl + b"\r\n"
        refused = refused or bad_chunk
    else:
        wire += payload
    return Case(wire + SECOND, refused, payload)


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    r = serve(echo)
    yield r
    r.stop()


_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def test_every_request_is_refused_or_framed_one_way(server: Running) -> None:
    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(cases())
    def check(case: Case) -> None:
        with connect(server.port) as sock:
            sock.sendall(case.wire)
            buf = bytearray()
            line, _, body = read_response(sock, buf)
            status = _STATUS.match(line)
            assert status is not None, line
            if case.refused:
                assert status.group(1) == b"400", (case.wire, line, body)
                assert not buf and closed_by_peer(sock), "more than the refusal was sent"
                return
            assert status.group(1) == b"200", (case.wire, line, body)
            assert body == b"POST /first  " + case.body, (case.wire, body)
            line, _, body = read_response(sock, buf)
            assert line.startswith(b"HTTP/1.1 200") and body == b"GET /second  ", (
                case.wire,
                line,
                body,
            )

    check()


@pytest.mark.parametrize(
    ("wire", "refused"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", False),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", True),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            True,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",  # noqa: E501
            False,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",  # noqa: E501
            True,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\nContent-Length: 3\r\n\r\nabc", True),
        (b"POST / HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc", True),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", True),
    ],
)
def test_known_framing_cases(server: Running, wire: bytes, refused: bool) -> None:
    """The classic smuggling shapes, named, beside the fuzzing above."""
    with connect(server.port) as sock:
        sock.sendall(wire)
        line, _, _ = read_response(sock, bytearray())
    assert line.startswith(b"HTTP/1.1 400" if refused else b"HTTP/1.1 200"), line
