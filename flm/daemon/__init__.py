"""The background process that owns running proxies and serves the loopback admin API."""
