"""Outbound traffic: direct, or through a SOCKS5 proxy (Tor or any other) with remote DNS.

Import from the submodules (this file imports nothing, so the CLI does not pay for aiohttp):

- :mod:`flm.egress.config`    :class:`EgressConfig`, endpoint parsing, :func:`is_loopback_target`
- :mod:`flm.egress.probe`     :func:`probe`: is the SOCKS5 endpoint answering the handshake?
- :mod:`flm.egress.policy`    :func:`decide_egress`: fail-closed / fail-open at start, events
- :mod:`flm.egress.connector` :func:`connector_for`: the aiohttp connector for one target URL
"""
