"""The gateway's JSON body parser gives exactly what ``json.loads`` gives, or a 400."""

from __future__ import annotations

import json

import pytest

from flm.openai.errors import HttpError
from flm.proxy.asgi import parse_json

SAME = [
    b'{"model":"flm://e/m","messages":[{"role":"user","content":"hi"}]}',
    b'  {"a": 1}',  # leading whitespace
    b'{"a": 1} \r\n\t',  # trailing JSON whitespace
    b"[1, 2.5, -3e2, true, false, null]",
    b'"just a string"',
    b"NaN",
    b'{"x": Infinity}',
    '{"t": "日本語 ☃"}'.encode(),
    '{"t": "caf\u00e9"}'.encode("utf-16"),  # not UTF-8: json.loads detects the encoding
    b'\xef\xbb\xbf{"bom": true}',
    b'{"a": {"b": [{"c": []}]}}',
]
REFUSED = [
    b"",
    b"   ",
    b'{"a": 1} x',
    b'{"a": 1}{"b": 2}',
    b'{"a": 1}\x0b',  # vertical tab is not JSON whitespace
    b'{"a": 1}\xc2\xa0',  # nor is a no-break space
    b'{"a": }',
    b'{"a": "unterminated}',
    b"\xff\xfe\xfa",
]


@pytest.mark.parametrize("body", SAME)
def test_same_value_as_json_loads(body: bytes) -> None:
    expected = json.loads(body)
    got = parse_json(body)
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize("body", REFUSED)
def test_invalid_bodies_are_a_400(body: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(HttpError) as caught:
        parse_json(body)
    assert caught.value.status == 400 and caught.value.code == "invalid_request"
