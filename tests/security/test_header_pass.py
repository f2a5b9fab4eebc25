"""The security middleware reads request headers from one index per request: the first of a
repeated header counts (as a lookup by name would find it), except Authorization, where every
value is found so that a duplicate can be refused."""

from flm.proxy.asgi import header, header_index
from flm.proxy.middleware.security import _authorization

HEADERS = [
    (b"user-agent", b"first-agent"),
    (b"authorization", b"Bearer a"),
    (b"origin", b"https://one.example"),
    (b"content-length", b"12"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"user-agent", b"second-agent"),
    (b"origin", b"https://two.example"),
    (b"authorization", b"Bearer b"),
    (b"content-length", b"99"),
    (b"x-forwarded-for", b"10.0.0.3"),
]


def test_first_of_repeated_headers_counts_and_every_authorization_is_found() -> None:
    scope = {"headers": HEADERS}
    index = header_index(scope)
    assert index is header_index(scope)  # made once, kept in the scope
    assert (
        index[b"user-agent"] == b"first-agent"
        and header(scope, b"user-agent") == index[b"user-agent"]
    )
    assert index[b"origin"] == b"https://one.example"
    assert index[b"content-length"] == b"12" and index[b"x-forwarded-for"] == b"10.0.0.1"
    assert _authorization(index, HEADERS) == [b"Bearer a", b"Bearer b"]


def test_one_or_no_authorization_header() -> None:
    one = [(b"authorization", b"Bearer a"), (b"user-agent", b"x")]
    assert _authorization(header_index({"headers": one}), one) == [b"Bearer a"]
    # repeated names elsewhere still leave a single Authorization header alone
    other = [(b"authorization", b"Bearer a"), (b"accept", b"x"), (b"accept", b"y")]
    assert _authorization(header_index({"headers": other}), other) == [b"Bearer a"]
    none = [(b"access-control-request-method", b"POST")]
    assert _authorization(header_index({"headers": none}), none) == []
    assert header({"headers": none}, b"origin") is None
