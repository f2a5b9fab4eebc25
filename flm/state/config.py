"""``--state-backend``, ``--state-password-file`` and ``--state-fail-open``, checked once.

The password never travels on a command line or in a URL: a URL carrying one is refused, and
the password file is read by the process that connects (the daemon), each time it connects.
What is shown (``flm proxy status``, logs, events) is :attr:`StateBackendConfig.display`: the
URL without credentials.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flm.core.errors import ProxyError

SCHEMES = ("redis", "rediss")
#: The most a password file may hold (a password is a line, not a document).
MAX_PASSWORD_BYTES = 4096


@dataclass(frozen=True)
class StateBackendConfig:
    #: ``redis://host:port/db`` or ``rediss://…`` (TLS); a user name may be in it, never a
    #: password
    url: str
    password_file: str | None = None
    #: keep serving on this process's local state while Redis is unreachable
    fail_open: bool = False
    #: ``rediss://``: the CA bundle that signed Redis's certificate (default: the system's)
    ca_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss://")

    @property
    def display(self) -> str:
        """The URL as shown anywhere: scheme, host, port and database only."""
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"{parts.scheme}://{host}:{parts.port or 6379}/{self.db}"

    @property
    def db(self) -> int:
        path = urlsplit(self.url).path.strip("/")
        return int(path) if path else 0

    def password(self) -> str | None:
        """The password from the file (first line, surrounding white space taken off)."""
        if self.password_file is None:
            return None
        return read_password_file(self.password_file)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "password_file": self.password_file,
            "fail_open": self.fail_open,
            "ca_file": self.ca_file,
        }

    @classmethod
    def from_options(
        cls,
        url: str | None,
        password_file: str | None,
        fail_open: bool,
        ca_file: str | None = None,
    ) -> StateBackendConfig | None:
        """The checked options, or None for the local backend; ``ProxyError`` when wrong."""
        if not url:
            if password_file or fail_open or ca_file:
                raise ProxyError(
                    "--state-password-file, --state-ca-file and --state-fail-open need "
                    "--state-backend redis://HOST:PORT/DB"
                )
            return None
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ProxyError(
                f"--state-backend must be a redis:// or rediss:// URL, got scheme "
                f"{parts.scheme or '(none)'!r}"
            )
        if parts.password is not None:
            raise ProxyError(
                "--state-backend must not carry a password (it would show in process lists "
                "and shell history): put it in a file and pass --state-password-file PATH"
            )
        if not parts.hostname:
            raise ProxyError("--state-backend needs a host: redis://HOST:PORT/DB")
        try:
            port = parts.port
        except ValueError:
            raise ProxyError(f"--state-backend has an invalid port: {url!r}") from None
        if port == 0:
            raise ProxyError("--state-backend port must be 1-65535")
        db = parts.path.strip("/")
        if db and (not db.isdigit() or int(db) > 65535):
            raise ProxyError(f"--state-backend database must be a number, got {db!r}")
        if parts.query or parts.fragment:
            raise ProxyError("--state-backend takes no query string: redis://HOST:PORT/DB")
        if password_file is not None:
            password_file = str(Path(password_file).expanduser().resolve())
            read_password_file(password_file)  # (refused now rather than at connect time)
        if ca_file is not None:
            if parts.scheme != "rediss":
                raise ProxyError("--state-ca-file applies to a rediss:// (TLS) backend only")
            ca_file = str(Path(ca_file).expanduser().resolve())
            if not os.path.isfile(ca_file):
                raise ProxyError(f"--state-ca-file {ca_file} is not a file")
        return cls(url, password_file, bool(fail_open), ca_file)

    @classmethod
    def from_dict(cls, data: Any) -> StateBackendConfig | None:
        if not isinstance(data, dict):
            return None
        return cls.from_options(
            data.get("url"),
            data.get("password_file"),
            bool(data.get("fail_open")),
            data.get("ca_file"),
        )


def read_password_file(path: str) -> str:
    """The password in ``path``; ``ProxyError`` when it cannot be read, is empty, or can be
    read by other users (like an SSH key, it must be 0600 or stricter)."""
    try:
        info = os.stat(path)
        if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ProxyError(
                f"--state-password-file {path} is readable by other users: chmod 600 it"
            )
        with open(path, "rb") as f:
            raw = f.read(MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise ProxyError(
            f"cannot read --state-password-file {path}: {exc.strerror or exc}"
        ) from None
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ProxyError(f"--state-password-file {path} is too large for a password")
    lines = raw.decode("utf-8", "replace").strip().splitlines()
    if not lines or not lines[0].strip():
        raise ProxyError(f"--state-password-file {path} is empty")
    return lines[0].strip()
