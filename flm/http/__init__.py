"""FLM's own HTTP/1.1 code: the server (:mod:`.server`) that serves the gateway's ASGI apps, the
ASGI types it speaks (:mod:`.asgi`), and the pooled client (:mod:`.client`, over one protocol
per connection in :mod:`.connection`) that talks to engines.

This package knows nothing of the gateway: it imports only :mod:`flm.core` (its error classes)
and takes what is FLM's — the refusal body, the headers on every response, the socket opener
for egress — as arguments. ``tests/test_import_rules.py`` holds that."""
