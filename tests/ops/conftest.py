"""Fixtures shared with the security tests."""

from tests.security.conftest import env  # noqa: F401 (a fixture, registered by import)
