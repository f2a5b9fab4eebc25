"""A Cloudflare v4 DNS API emulator on loopback, with its zones also served over DNS (UDP).

It follows Cloudflare's published API reference for the calls an ACME DNS-01 client makes:

- List Zones, ``GET /client/v4/zones?name=…``:
  https://developers.cloudflare.com/api/resources/zones/methods/list/
- Create DNS Record, ``POST /client/v4/zones/{zone_id}/dns_records``:
  https://developers.cloudflare.com/api/resources/dns/subresources/records/methods/create/
- Delete DNS Record, ``DELETE /client/v4/zones/{zone_id}/dns_records/{dns_record_id}`` (the
  result is ``{"id": …}``):
  https://developers.cloudflare.com/api/resources/dns/subresources/records/methods/delete/
- List DNS Records, ``GET /client/v4/zones/{zone_id}/dns_records``:
  https://developers.cloudflare.com/api/resources/dns/subresources/records/methods/list/
- API tokens (``Authorization: Bearer <token>``) and the response envelope
  ``{"success", "errors": [{"code", "message"}], "messages", "result"}``:
  https://developers.cloudflare.com/fundamentals/api/get-started/create-token/ and
  https://developers.cloudflare.com/fundamentals/api/

Where it differs: one account, one token, TXT/A/AAAA/CNAME records only, no pagination beyond
one page, no ``proxied`` behaviour. Errors use the documented envelope (``success: false`` and
``errors``); a wrong token gets 403 with code 10000 ("Authentication error"), a missing or
malformed ``Authorization`` header 400 with 6003, an unknown zone 404 with 7003, an unknown
record 404 with 81044. Those numbers are what Cloudflare is commonly seen to answer, not a
documented contract, and the texts are the emulator's own: a client should rely on the HTTP
status and ``success`` (FLM's provider does, plus 10000/9109 to recognise a bad token).

Why it also answers DNS: Cloudflare publishes every record on its authoritative servers at once.
To let an ACME CA (Pebble, with ``-dnsserver 127.0.0.1:<dns_port>``) validate DNS-01 against
the emulator, the same zones are served over UDP DNS on loopback (dnspython for the wire format),
authoritatively: TXT, A, AAAA, CNAME from the API's records, SOA and NS synthesised. The zone's
``name_servers`` are made-up names, so FLM's profile names ``--check-server 127.0.0.1:<dns_port>``
for the propagation check.

    with start_cloudflare(token="t0k", zones=["example.org"]) as cf:
        cf.api_base  # http://127.0.0.1:PORT/client/v4
        cf.dns_port  # UDP
        cf.records("example.org")
"""

from __future__ import annotations

import http.server
import json
import secrets
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

API_PREFIX = "/client/v4"
_TYPES = ("TXT", "A", "AAAA", "CNAME")


@dataclass
class Zone:
    id: str
    name: str
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        now = _now()
        return {
            "id": self.id,
            "name": self.name,
            "status": "active",
            "paused": False,
            "type": "full",
            "name_servers": [f"ada.ns.emulator.{self.name}", f"bob.ns.emulator.{self.name}"],
            "created_on": now,
            "modified_on": now,
        }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CloudflareEmulator:
    def __init__(self, token: str, zones: Iterable[str]) -> None:
        self.token = token
        self._lock = threading.Lock()
        self.zones = {
            z.rstrip(".").lower(): Zone(secrets.token_hex(16), z.rstrip(".").lower()) for z in zones
        }
        #: (method, path, authorized) of every API request, in order.
        self.requests: list[tuple[str, str, bool]] = []
        #: (name, type) of every DNS question answered.
        self.dns_queries: list[tuple[str, str]] = []
        self._http: http.server.ThreadingHTTPServer | None = None
        self._udp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        assert self._http is not None
        return f"http://127.0.0.1:{self._http.server_address[1]}{API_PREFIX}"

    @property
    def dns_port(self) -> int:
        assert self._udp is not None
        return int(self._udp.getsockname()[1])

    def start(self) -> None:
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(("127.0.0.1", 0))
        self._udp.settimeout(0.2)
        self._threads = [
            threading.Thread(target=self._http.serve_forever, daemon=True),
            threading.Thread(target=self._serve_dns, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._udp is not None:
            self._udp.close()

    def records(self, zone: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.zones[zone].records.values()]

    # --- the API ---------------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(target)
        path = parts.path
        auth = headers.get("Authorization") or ""
        authorized = auth == f"Bearer {self.token}"
        with self._lock:
            self.requests.append((method, path, authorized))
        if not path.startswith(API_PREFIX + "/"):
            return 404, _fail(7000, "No route for that URI")
        if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
            return 400, _fail(6003, "Invalid request headers")
        if not authorized:
            return 403, _fail(10000, "Authentication error")
        segments = [s for s in path[len(API_PREFIX) :].split("/") if s]
        if segments == ["zones"] and method == "GET":
            name = (parse_qs(parts.query).get("name") or [""])[0].rstrip(".").lower()
            with self._lock:
                found = [z.view() for z in self.zones.values() if not name or z.name == name]
            return 200, _ok(
                found,
                info={
                    "page": 1,
                    "per_page": 20,
                    "count": len(found),
                    "total_count": len(found),
                    "total_pages": 1,
                },
            )
        if len(segments) >= 3 and segments[0] == "zones" and segments[2] == "dns_records":
            with self._lock:
                zone = next((z for z in self.zones.values() if z.id == segments[1]), None)
            if zone is None:
                return 404, _fail(7003, "Could not route to the zone: unknown identifier")
            if len(segments) == 3 and method == "POST":
                return self._create(zone, body)
            if len(segments) == 3 and method == "GET":
                with self._lock:
                    found = list(zone.records.values())
                return 200, _ok(
                    found,
                    info={
                        "page": 1,
                        "per_page": 100,
                        "count": len(found),
                        "total_count": len(found),
                        "total_pages": 1,
                    },
                )
            if len(segments) == 4 and method == "DELETE":
                with self._lock:
                    gone = zone.records.pop(segments[3], None)
                if gone is None:
                    return 404, _fail(81044, "Record does not exist.")
                return 200, _ok({"id": segments[3]})
        return 405, _fail(10405, f"Method {method} not allowed for this path")

    def _create(self, zone: Zone, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return 400, _fail(9207, "Request body is invalid.")
        if not isinstance(data, dict):
            return 400, _fail(9207, "Request body is invalid.")
        rtype = str(data.get("type") or "").upper()
        name = str(data.get("name") or "").rstrip(".").lower()
        content = data.get("content")
        ttl = data.get("ttl", 1)
        if rtype not in _TYPES:
            return 400, _fail(9004, f"record type {rtype!r} is not supported by the emulator")
        if not name or not (name == zone.name or name.endswith("." + zone.name)):
            return 400, _fail(9005, "DNS name is invalid or outside the zone")
        if not isinstance(content, str) or not content:
            return 400, _fail(9006, "content is required")
        if not isinstance(ttl, int) or not (ttl == 1 or 60 <= ttl <= 86400):
            return 400, _fail(9021, "TTL must be 1 (automatic) or between 60 and 86400")
        now = _now()
        record_id = secrets.token_hex(16)
        record: dict[str, Any] = {
            "id": record_id,
            "zone_id": zone.id,
            "zone_name": zone.name,
            "name": name,
            "type": rtype,
            "content": content,
            "proxiable": False,
            "proxied": False,
            "ttl": ttl,
            "comment": data.get("comment"),
            "tags": [],
            "meta": {},
            "created_on": now,
            "modified_on": now,
        }
        with self._lock:
            zone.records[record_id] = record
        return 200, _ok(record)

    # --- DNS -------------------------------------------------------------------------------------

    def _serve_dns(self) -> None:
        assert self._udp is not None
        while not self._stopping.is_set():
            try:
                wire, peer = self._udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = self.answer(dns.message.from_wire(wire))
            except Exception:  # noqa: S112 - a malformed packet gets no answer
                continue
            try:
                self._udp.sendto(reply.to_wire(max_size=1232), peer)
            except OSError:
                continue

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags &= ~dns.flags.RA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.dns_queries.append((name, rdtype))
            zone = next(
                (z for z in self.zones.values() if name == z.name or name.endswith("." + z.name)),
                None,
            )
            records = [dict(r) for r in zone.records.values()] if zone else []
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA
        origin = dns.name.from_text(zone.name)
        if rdtype == "SOA" and name == zone.name:
            response.answer.append(_soa(origin))
            return response
        if rdtype == "NS" and name == zone.name:
            rrset = dns.rrset.RRset(origin, dns.rdataclass.IN, dns.rdatatype.NS)
            for ns in zone.view()["name_servers"]:
                rrset.add(dns.rdata.from_text("IN", "NS", ns + "."), 300)
            response.answer.append(rrset)
            return response
        matching = [r for r in records if r["name"] == name and r["type"] == rdtype]
        if matching:
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, question.rdtype)
            for record in matching:
                rrset.add(
                    dns.rdata.from_text("IN", rdtype, _rdata_text(record)),
                    300 if record["ttl"] == 1 else int(record["ttl"]),
                )
            response.answer.append(rrset)
            return response
        exists = name == zone.name or any(r["name"] == name for r in records)
        if not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(_soa(origin))
        return response


def _rdata_text(record: dict[str, Any]) -> str:
    content = str(record["content"])
    if record["type"] != "TXT":
        return content
    text = content[1:-1] if len(content) >= 2 and content[0] == content[-1] == '"' else content
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _soa(origin: dns.name.Name) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(origin, dns.rdataclass.IN, dns.rdatatype.SOA)
    rrset.add(
        dns.rdata.from_text(
            "IN", "SOA", f"ada.ns.emulator.{origin} dns.emulator.{origin} 1 10000 2400 604800 60"
        ),
        60,
    )
    return rrset


def _ok(result: Any, info: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if info is not None:
        body["result_info"] = info
    return body


def _fail(code: int, message: str) -> dict[str, Any]:
    return {
        "success": False,
        "errors": [{"code": code, "message": message}],
        "messages": [],
        "result": None,
    }


def _handler(emulator: CloudflareEmulator) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _run(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, payload = emulator.handle(self.command, self.path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _run

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def start_cloudflare(
    token: str, zones: Iterable[str] = ("example.org",)
) -> Iterator[CloudflareEmulator]:
    emulator = CloudflareEmulator(token, zones)
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()
