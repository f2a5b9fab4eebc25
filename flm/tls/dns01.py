"""ACME DNS-01: TXT records through a DNS provider, and waiting until the zone serves them.

One interface, :class:`DnsProvider` (``add_txt`` / ``delete_txt`` / the servers to watch), two
providers:

- :class:`Rfc2136Provider`: RFC 2136 dynamic updates signed with TSIG (RFC 8945), the standard
  BIND, Knot, PowerDNS and Windows DNS speak. dnspython does the wire format.
- :class:`CloudflareProvider`: Cloudflare's v4 API with an API token (``GET /zones?name=``,
  ``POST``/``DELETE /zones/{id}/dns_records``).

:class:`Dns01Solver` is what the ACME client drives: ``present`` creates every TXT record of an
order and waits (bounded) until each server that answers for the zone returns all of them;
``cleanup`` removes exactly the records it created — the client calls it in a ``finally``, so
the records go also when validation fails.

Every failure is a :class:`~flm.core.errors.ProxyAcmeError` subclass with its own code and the
fix in the message: ``DNS_AUTH_FAILED``, ``DNS_ZONE_NOT_FOUND``, ``DNS_UPDATE_REFUSED``,
``DNS_SERVER_UNREACHABLE``, ``DNS_RECORD_NOT_VISIBLE``. No message ever contains the secret.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update

from flm.core.errors import (
    DnsAuthError,
    DnsNotVisibleError,
    DnsServerUnreachableError,
    DnsUpdateRefusedError,
    DnsZoneNotFoundError,
    ProxyAcmeError,
    UsageError,
)

log = logging.getLogger(__name__)

CLOUDFLARE_API = "https://api.cloudflare.com/client/v4"
ACME_LABEL = "_acme-challenge"
TXT_TTL = 60
#: One DNS query or API call never waits longer than this.
QUERY_TIMEOUT_S = 5.0

Progress = Callable[[str], None]
Server = tuple[str, int]


def parse_server(text: str, default_port: int = 53) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 address."""
    value = text.strip()
    host, port = value, default_port
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise UsageError(f"bad server address {text!r}")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"bad server address {text!r}")
            port = _port(rest[1:], text)
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = _port(port_text, text)
    if not host or any(c.isspace() for c in host):
        raise UsageError(f"bad server address {text!r}")
    return host, port


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"bad port in {whole!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"bad port in {whole!r}")
    return port


def challenge_name(identifier: str) -> str:
    """Where the TXT record for ``identifier`` goes (RFC 8555 §8.4); for a wildcard order the
    CA's identifier is the base name, so ``*.example.org`` and ``example.org`` share it."""
    return f"{ACME_LABEL}.{identifier.removeprefix('*.').rstrip('.').lower()}"


def _fix_profile(profile: str) -> str:
    return f"`flm secrets dns add {profile} --replace ...`"


# --- the interface -------------------------------------------------------------------------------


class DnsProvider:
    """Create and delete TXT records in one zone; say which servers answer for it."""

    kind = "?"

    def __init__(self, profile: str, zone: str, check_servers: Sequence[str] = ()) -> None:
        self.profile = profile
        self.zone = zone.rstrip(".").lower()
        self._check_servers = list(check_servers)

    def check_in_zone(self, fqdn: str) -> None:
        name = fqdn.rstrip(".").lower()
        if name != self.zone and not name.endswith("." + self.zone):
            raise DnsZoneNotFoundError(
                f"{fqdn} is not in zone {self.zone} of DNS profile {self.profile!r}: use a "
                f"profile whose --zone contains the certificate's names",
                details={"profile": self.profile, "zone": self.zone, "name": fqdn},
            )

    def add_txt(self, fqdn: str, value: str) -> Any:
        """Create one TXT record; returns what :meth:`delete_txt` needs to remove it."""
        raise NotImplementedError

    def delete_txt(self, fqdn: str, value: str, handle: Any) -> None:
        raise NotImplementedError

    def default_check_servers(self) -> list[Server]:
        raise NotImplementedError

    def check_servers(self) -> list[Server]:
        """The servers to wait on: the profile's ``--check-server`` list, else the zone's own."""
        if self._check_servers:
            return [parse_server(s) for s in self._check_servers]
        return self.default_check_servers()

    def close(self) -> None:
        """Release connections (nothing by default)."""


# --- RFC 2136 ------------------------------------------------------------------------------------


class Rfc2136Provider(DnsProvider):
    kind = "rfc2136"

    def __init__(
        self,
        profile: str,
        zone: str,
        server: str,
        tsig_name: str,
        tsig_algorithm: str,
        secret: str,
        check_servers: Sequence[str] = (),
    ) -> None:
        super().__init__(profile, zone, check_servers)
        self.host, self.port = parse_server(server)
        self.tsig_name = tsig_name
        self.tsig_algorithm = tsig_algorithm
        self._key = dns.tsig.Key(tsig_name, secret, tsig_algorithm)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def _address(self) -> str:
        try:
            return str(ipaddress.ip_address(self.host))
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise DnsServerUnreachableError(
                f"cannot resolve the DNS server {self.host} of profile {self.profile!r}: {exc}"
            ) from None
        return str(infos[0][4][0])

    def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        address = self._address()
        try:
            response = dns.query.tcp(update, address, port=self.port, timeout=QUERY_TIMEOUT_S)
        except dns.tsig.PeerBadTime:
            raise DnsAuthError(
                f"the DNS server {self.where} refused the TSIG signature's time while {what}: "
                "this machine's clock and the server's differ by more than 5 minutes; fix the "
                "clock (NTP)",
                details=self._details(),
            ) from None
        except dns.tsig.PeerError as exc:
            reason = (
                "does not know the key name"
                if isinstance(exc, dns.tsig.PeerBadKey)
                else "rejected the signature (wrong secret or algorithm)"
            )
            raise DnsAuthError(
                f"the DNS server {self.where} {reason} for TSIG key {self.tsig_name!r} while "
                f"{what}. Check that --tsig-name, --tsig-algorithm ({self.tsig_algorithm}) and "
                "the secret match the server's `key` statement, then store them again with "
                f"{_fix_profile(self.profile)}",
                details=self._details(),
            ) from None
        except (dns.exception.Timeout, OSError) as exc:
            raise DnsServerUnreachableError(
                f"cannot reach the DNS server {self.where} of profile {self.profile!r} while "
                f"{what} ({_reason(exc)}): is it running, and is --server right (TCP and UDP "
                "port reachable)?",
                details=self._details(),
            ) from None
        except dns.exception.DNSException as exc:
            raise DnsUpdateRefusedError(
                f"unexpected answer from the DNS server {self.where} while {what}: "
                f"{type(exc).__name__}",
                details=self._details(),
            ) from None
        rcode = response.rcode()
        if rcode == dns.rcode.NOERROR:
            return
        name = dns.rcode.to_text(rcode)
        if rcode in (dns.rcode.NOTAUTH, dns.rcode.NOTZONE):
            raise DnsZoneNotFoundError(
                f"the DNS server {self.where} is not authoritative for zone {self.zone} "
                f"({name}) while {what}: check --zone (the zone as the server defines it) and "
                "--server (its primary), then update the profile with "
                f"{_fix_profile(self.profile)}",
                details={**self._details(), "rcode": name},
            )
        if rcode == dns.rcode.REFUSED:
            raise DnsUpdateRefusedError(
                f"the DNS server {self.where} refused the update ({name}) while {what}: allow "
                f"key {self.tsig_name!r} to change TXT records in {self.zone}, e.g. in BIND "
                f"`update-policy {{ grant {self.tsig_name} zonesub TXT; }};` in the zone",
                details={**self._details(), "rcode": name},
            )
        raise DnsUpdateRefusedError(
            f"the DNS server {self.where} answered {name} while {what}; see its log",
            details={**self._details(), "rcode": name},
        )

    def _details(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "provider": self.kind,
            "server": self.where,
            "zone": self.zone,
            "tsig_name": self.tsig_name,
        }

    def add_txt(self, fqdn: str, value: str) -> Any:
        self.check_in_zone(fqdn)
        update = dns.update.UpdateMessage(self.zone, keyring=self._key)
        update.add(dns.name.from_text(fqdn), TXT_TTL, "TXT", _txt(value))
        self._send(update, f"adding the TXT record {fqdn}")
        return None

    def delete_txt(self, fqdn: str, value: str, handle: Any) -> None:
        update = dns.update.UpdateMessage(self.zone, keyring=self._key)
        update.delete(dns.name.from_text(fqdn), "TXT", _txt(value))
        self._send(update, f"removing the TXT record {fqdn}")

    def default_check_servers(self) -> list[Server]:
        """The primary, plus the addresses of the zone's NS records as the primary gives them.

        A name server with the primary's address is asked on the primary's port; others on 53.
        """
        primary = (self._address(), self.port)
        servers = [primary]
        try:
            ns = _query(primary, self.zone, dns.rdatatype.NS)
        except (dns.exception.DNSException, OSError):
            return servers
        for rrset in ns.answer:
            for rdata in rrset:
                for address in _addresses(primary, str(rdata.target)):
                    port = self.port if address == primary[0] else 53
                    if (address, port) not in servers:
                        servers.append((address, port))
        return servers


def _txt(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- Cloudflare ----------------------------------------------------------------------------------


class CloudflareProvider(DnsProvider):
    """Cloudflare's v4 API with a scoped API token (Zone:Read and DNS:Edit on the zone)."""

    kind = "cloudflare"

    def __init__(
        self, profile: str, zone: str, api_base: str, token: str, check_servers: Sequence[str] = ()
    ) -> None:
        import requests

        super().__init__(profile, zone, check_servers)
        self.api_base = api_base.rstrip("/")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"
        self._session.headers["User-Agent"] = "flm-acme-dns01"
        self._zone: dict[str, Any] | None = None

    def close(self) -> None:
        self._session.close()

    def _details(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "provider": self.kind,
            "api_base": self.api_base,
            "zone": self.zone,
        }

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        import requests

        url = self.api_base + path
        try:
            response = self._session.request(method, url, timeout=QUERY_TIMEOUT_S, **kwargs)
        except requests.RequestException as exc:
            raise DnsServerUnreachableError(
                f"cannot reach the Cloudflare API at {self.api_base} while {what} "
                f"({type(exc).__name__}): check the network (and --api-base)",
                details=self._details(),
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        errors = body.get("errors") if isinstance(body, dict) else None
        text = (
            "; ".join(
                f"{e.get('code')}: {e.get('message')}" for e in errors or [] if isinstance(e, dict)
            )
            or f"HTTP {response.status_code}"
        )
        if response.status_code in (401, 403) and not body.get("success", False):
            codes = {e.get("code") for e in errors or [] if isinstance(e, dict)}
            if response.status_code == 401 or 10000 in codes or 9109 in codes:
                raise DnsAuthError(
                    f"the Cloudflare API did not accept the token of DNS profile "
                    f"{self.profile!r} while {what} ({text}): create an API token with "
                    f"Zone:Read and DNS:Edit for {self.zone} and store it with "
                    f"{_fix_profile(self.profile)}",
                    details=self._details(),
                )
            raise DnsUpdateRefusedError(
                f"the Cloudflare API refused {what} ({text}): the token needs the DNS:Edit "
                f"permission on zone {self.zone}",
                details=self._details(),
            )
        if not response.ok or not body.get("success", False):
            raise DnsUpdateRefusedError(
                f"the Cloudflare API refused {what} ({text})", details=self._details()
            )
        return body.get("result")

    def _zone_info(self) -> dict[str, Any]:
        if self._zone is None:
            result = self._call(
                "GET", "/zones", f"looking up zone {self.zone}", params={"name": self.zone}
            )
            if not isinstance(result, list) or not result:
                raise DnsZoneNotFoundError(
                    f"the Cloudflare account behind the token of profile {self.profile!r} has "
                    f"no zone {self.zone} (or the token may not read it): check --zone, and "
                    "give the token Zone:Read on it",
                    details=self._details(),
                )
            self._zone = dict(result[0])
        return self._zone

    def add_txt(self, fqdn: str, value: str) -> Any:
        self.check_in_zone(fqdn)
        zone_id = self._zone_info()["id"]
        record = self._call(
            "POST",
            f"/zones/{zone_id}/dns_records",
            f"creating the TXT record {fqdn}",
            json={
                "type": "TXT",
                "name": fqdn.rstrip("."),
                "content": value,
                "ttl": TXT_TTL,
                "comment": "flm ACME DNS-01",
            },
        )
        return str(record["id"])

    def delete_txt(self, fqdn: str, value: str, handle: Any) -> None:
        zone_id = self._zone_info()["id"]
        self._call(
            "DELETE", f"/zones/{zone_id}/dns_records/{handle}", f"removing the TXT record {fqdn}"
        )

    def default_check_servers(self) -> list[Server]:
        servers: list[Server] = []
        for host in self._zone_info().get("name_servers") or []:
            try:
                infos = socket.getaddrinfo(str(host), 53, type=socket.SOCK_DGRAM)
            except OSError:
                continue
            for info in infos:
                server = (str(info[4][0]), 53)
                if server not in servers:
                    servers.append(server)
        return servers


# --- queries -------------------------------------------------------------------------------------


def _query(
    server: Server, name: str, rdtype: dns.rdatatype.RdataType, timeout: float = QUERY_TIMEOUT_S
) -> dns.message.Message:
    """One non-recursive query over UDP (TCP when truncated)."""
    query = dns.message.make_query(name, rdtype)
    query.flags &= ~dns.flags.RD
    response, _tcp = dns.query.udp_with_fallback(query, server[0], timeout=timeout, port=server[1])
    return response


def _addresses(primary: Server, host: str) -> list[str]:
    found: list[str] = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            response = _query(primary, host, rdtype)
        except (dns.exception.DNSException, OSError):
            continue
        found += [
            str(r.address) for rrset in response.answer for r in rrset if rrset.rdtype == rdtype
        ]
    if not found:
        try:
            found = [str(i[4][0]) for i in socket.getaddrinfo(host, 53, type=socket.SOCK_DGRAM)]
        except OSError:
            return []
    return list(dict.fromkeys(found))


def txt_values(server: Server, name: str, timeout: float = 2.0) -> set[str]:
    """The TXT strings ``server`` answers for ``name`` (empty when none)."""
    response = _query(server, name, dns.rdatatype.TXT, timeout)
    values: set[str] = set()
    for rrset in response.answer:
        if rrset.rdtype != dns.rdatatype.TXT:
            continue
        for rdata in rrset:
            values.add(b"".join(rdata.strings).decode("ascii", "replace"))
    return values


def _reason(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "no answer"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return getattr(exc, "strerror", None) or type(exc).__name__


# --- the solver ----------------------------------------------------------------------------------


class Dns01Solver:
    """Publish an order's TXT records, wait until they are visible, and remove them again."""

    def __init__(
        self,
        provider: DnsProvider,
        propagation_timeout_s: float,
        progress: Progress | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.provider = provider
        self.propagation_timeout_s = propagation_timeout_s
        self.progress = progress
        self.poll_interval_s = poll_interval_s
        self._added: list[tuple[str, str, Any]] = []
        #: Records whose removal failed in the last ``cleanup`` (name, reason).
        self.cleanup_errors: list[tuple[str, str]] = []

    def _say(self, message: str) -> None:
        log.info("%s", message, extra={"dns_profile": self.provider.profile})
        if self.progress is not None:
            self.progress(message)

    def present(self, records: Sequence[tuple[str, str]], deadline: float) -> None:
        """Create every ``(name, value)`` TXT record, then wait until all are visible."""
        for name, _value in records:
            self.provider.check_in_zone(name)
        for name, value in records:
            self._say(
                f"creating TXT {name} ({self.provider.kind}, profile {self.provider.profile})"
            )
            handle = self.provider.add_txt(name, value)
            self._added.append((name, value, handle))
        self.wait_visible(records, min(deadline, time.monotonic() + self.propagation_timeout_s))

    def wait_visible(self, records: Sequence[tuple[str, str]], deadline: float) -> None:
        servers = self.provider.check_servers()
        if not servers:
            raise DnsNotVisibleError(
                f"no server to check zone {self.provider.zone} on: give the profile "
                f"--check-server HOST[:PORT] ({_fix_profile(self.provider.profile)})"
            )
        wanted: dict[str, set[str]] = {}
        for name, value in records:
            wanted.setdefault(name, set()).add(value)
        started = time.monotonic()
        missing: dict[str, str] = {}
        while True:
            missing = {}
            for server in servers:
                for name, values in wanted.items():
                    where = f"{server[0]}:{server[1]}"
                    try:
                        seen = txt_values(server, name)
                    except (dns.exception.DNSException, OSError) as exc:
                        missing[f"{name} @ {where}"] = _reason(exc)
                        continue
                    if not values <= seen:
                        missing[f"{name} @ {where}"] = "not answered yet"
            if not missing:
                self._say(
                    f"TXT records visible on {len(servers)} server(s) after "
                    f"{time.monotonic() - started:.0f} s"
                )
                return
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._say(
                f"waiting for {len(missing)} TXT answer(s) "
                f"({time.monotonic() - started:.0f} s, up to "
                f"{self.propagation_timeout_s:.0f} s)"
            )
            time.sleep(min(self.poll_interval_s, left))
        listing = "; ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
        raise DnsNotVisibleError(
            f"the TXT records were created but not visible on every server of zone "
            f"{self.provider.zone} within {time.monotonic() - started:.0f} s ({listing}). "
            "Check that these are the zone's authoritative servers and that the primary "
            "notifies its secondaries, or wait longer (--propagation-timeout), or name the "
            f"servers to watch (--check-server) with {_fix_profile(self.provider.profile)}",
            details={"profile": self.provider.profile, "missing": sorted(missing)},
        )

    def cleanup(self) -> None:
        """Remove every record this solver created (errors are logged, never raised)."""
        self.cleanup_errors = []
        while self._added:
            name, value, handle = self._added.pop()
            try:
                self.provider.delete_txt(name, value, handle)
            except ProxyAcmeError as exc:
                self.cleanup_errors.append((name, exc.message))
                log.warning("could not remove the TXT record %s: %s", name, exc.message)
        self._say(
            "TXT records removed"
            if not self.cleanup_errors
            else f"{len(self.cleanup_errors)} TXT record(s) could not be removed"
        )


def provider_for(profile: Any, secret: str) -> DnsProvider:
    """The provider for a :class:`~flm.services.dns_secrets.DnsProfile` and its secret."""
    s = profile.settings
    checks = list(s.get("check_servers") or [])
    if profile.provider == "rfc2136":
        return Rfc2136Provider(
            profile.name,
            s["zone"],
            s["server"],
            s["tsig_name"],
            s.get("tsig_algorithm", "hmac-sha256"),
            secret,
            checks,
        )
    if profile.provider == "cloudflare":
        return CloudflareProvider(
            profile.name, s["zone"], s.get("api_base") or CLOUDFLARE_API, secret, checks
        )
    raise ProxyAcmeError(
        f"DNS profile {profile.name!r} has an unknown provider {profile.provider!r}"
    )
