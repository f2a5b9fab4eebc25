"""The security middleware reads the request headers it needs in one pass: the first of a
repeated header counts (as a lookup by name would find it), except Authorization, where every
value is kept so that a duplicate can be refused."""

from flm.proxy.middleware.security import _Headers


def test_first_of_repeated_headers_counts_and_every_authorization_is_kept() -> None:
    seen = _Headers([
        (b"user-agent", b"first-agent"),
        (b"authorization", b"Bearer a"),
        (b"origin", b"https://one.example"),
        (b"content-length", b"12"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-real-ip", b"10.0.0.2"),
        (b"user-agent", b"second-agent"),
        (b"origin", b"https://two.example"),
        (b"authorization", b"Bearer b"),
        (b"content-length", b"99"),
        (b"x-forwarded-for", b"10.0.0.3"),
        (b"x-real-ip", b"10.0.0.4"),
    ])
    assert seen.user_agent == b"first-agent"
    assert seen.origin == b"https://one.example"
    assert seen.content_length == b"12"
    assert seen.forwarded == b"10.0.0.1"
    assert seen.real_ip == b"10.0.0.2"
    assert seen.authorization == [b"Bearer a", b"Bearer b"]
    assert seen.preflight is False


def test_absent_headers_and_preflight() -> None:
    seen = _Headers([(b"access-control-request-method", b"POST")])
    assert seen.preflight is True
    assert seen.user_agent == b""
    assert seen.origin is None and seen.content_length is None
    assert seen.forwarded is None and seen.real_ip is None
    assert seen.authorization == []


def test_the_index_kept_in_the_scope_agrees() -> None:
    from flm.proxy.asgi import header, header_index

    headers = [(b"user-agent", b"a"), (b"authorization", b"Bearer x"), (b"user-agent", b"b")]
    scope = {"headers": headers}
    assert header(scope, b"user-agent") == b"a" and header(scope, b"origin") is None
    assert header_index(scope) is header_index(scope)  # made once
    seen = _Headers(headers, header_index(scope))
    assert seen.user_agent == b"a" and seen.authorization == [b"Bearer x"]
    both = [(b"authorization", b"Bearer x"), (b"authorization", b"Bearer y")]
    assert _Headers(both, {b"authorization": b"Bearer x"}).authorization == [
        b"Bearer x", b"Bearer y"]
