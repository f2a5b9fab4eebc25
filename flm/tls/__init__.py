"""Certificates and TLS for the gateway.

Import from the submodules; this package file imports nothing so that ``import flm.tls.x`` stays
cheap (the ACME client pulls in ``requests``, which the CLI must not pay for at start-up).

- :mod:`flm.tls.certs`      PEM/X.509 primitives, :class:`CertBundle`, :class:`CaBundle`
- :mod:`flm.tls.issue`      ``dev-selfsigned`` and ``packaged-ca``: ``ensure_*`` functions
- :mod:`flm.tls.lan`        the machine's LAN addresses (no network access needed)
- :mod:`flm.tls.context`    hardened server ``SSLContext`` and :class:`ReloadableServerContext`
- :mod:`flm.tls.truststore` ``install_ca`` / ``uninstall_ca`` for the OS trust store
- :mod:`flm.tls.challenge`  the HTTP-01 challenge store the HTTP port serves from
- :mod:`flm.tls.acme_options` the ACME directory, challenge type and names asked for
- :mod:`flm.tls.acme_client`  ACME issuance, HTTP-01 and DNS-01 (``acme`` library)
- :mod:`flm.tls.acme_store`   issued ACME certificates on disk, checked on save and reuse
- :mod:`flm.tls.dns01`        DNS-01 providers (RFC 2136, Cloudflare) and the TXT-record solver
"""
