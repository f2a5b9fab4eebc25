"""Free ports for servers FLM starts (``flm.core.ports``): outside the kernel's ephemeral range,
where no outgoing connection can take them between the choice and the bind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from flm.core import ports


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("32768\t60999\n", range(12_768, 32_766)),  # Linux's default
        ("15000 61000", range(10_000, 14_998)),
        ("1024 20000", range(20_001, 65_000)),  # a low range: the ports above it
        ("1024 65535", range(0)),  # no room either side
        ("garbage", range(0)),
    ],
)
def test_the_range_outside_the_ephemeral_one(tmp_path: Path, content: str, expected: range) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text(content)
    assert ports.outside_ephemeral_range(str(path)) == expected
    assert ports.outside_ephemeral_range(str(tmp_path / "missing")) == range(0)


def test_free_ports_are_outside_the_ephemeral_range_bindable_and_never_repeated() -> None:
    outside = ports.outside_ephemeral_range()
    chosen = [ports.free_port() for _ in range(50)]
    assert len(set(chosen)) == 50
    if outside:  # (Linux: the kernel's own range is readable)
        assert all(port in outside for port in chosen)
    for port in chosen[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port already bound by someone else is never handed out (after the tries, the
    kernel's choice)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports.free_port()))
        taken = holder.getsockname()[1]
        monkeypatch.setattr(ports, "_OUTSIDE", range(taken, taken + 1))
        monkeypatch.setattr(ports, "_handed_out", set())
        assert ports.free_port(tries=20) != taken
        assert ports._handed_out == set()
