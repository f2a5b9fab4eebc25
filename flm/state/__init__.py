"""Where a gateway keeps the protection state several processes must agree on.

Two backends sit behind one seam:

- the **local** backend (:mod:`flm.state.local`, the default): per-process dictionaries, as
  every FLM gateway had before; nothing on the request path leaves the process;
- the **Redis** backend (:mod:`flm.state.redis`, ``flm proxy start --state-backend
  redis://HOST:PORT/DB``): rate-limit buckets, auth-failure counts, blocks, intrusion scores
  and key revocations live in Redis and are changed only by the Lua scripts of
  :mod:`flm.state.scripts` (one script call per request at most); blocks, unblocks and
  revocations are pushed to every process over one pub/sub channel.

This package knows nothing of FLM's storage or proxy: :mod:`flm.proxy.shared` wires the Redis
backend to a running gateway (its key table, policy and blocklist).
"""


class BackendDown(Exception):
    """The shared state backend is not reachable now (the caller fails closed or open)."""
