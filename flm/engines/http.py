"""The pooled upstream HTTP client and the one place aiohttp exceptions become FLM errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from flm.core.errors import (
    EngineApiError,
    EngineError,
    EngineNetworkError,
    EngineNotFoundError,
    EngineTimeoutError,
)

#: Largest non-streamed JSON body accepted from an engine.
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Header FLM's own listeners always send, so detection never mistakes FLM for an engine.
FLM_PROXY_HEADER = "X-FLM-Proxy"


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    first_byte_s: float = 60.0
    idle_s: float = 60.0
    #: A stream longer than this is cut (protects against engines that never stop).
    max_stream_s: float = 3600.0
    max_stream_bytes: int = 512 * 1024 * 1024


class FlmListenerError(EngineApiError):
    """The endpoint is one of FLM's own proxies, not an engine."""


def _status_error(status: int, message: str) -> EngineError:
    text = f"engine answered HTTP {status}: {message}"[:2000]
    err: EngineError
    if status == 404:
        err = EngineNotFoundError(text)
    elif status in (429, 503):
        err = EngineNetworkError(text)
    elif status == 504 or status == 408:
        err = EngineTimeoutError(text)
    else:
        err = EngineApiError(text)
        if 400 <= status < 500:
            err.http_status = 400
            err.http_code = "invalid_request"
    err.details = {"upstream_status": status}
    return err


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err is not None:
            return str(err)
    return str(data)[:500]


class UpstreamResponse:
    """A response whose headers arrived; the body is read with limits and timeouts."""

    def __init__(self, resp: aiohttp.ClientResponse, timeouts: Timeouts,
                 prefetched: bytes | None = None) -> None:
        self._resp = resp
        self._timeouts = timeouts
        self._prefetched = prefetched
        self.status = resp.status
        self.headers = resp.headers

    async def read_json(self, limit: int = MAX_JSON_BYTES) -> Any:
        body = await self.read(limit)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise EngineApiError(f"engine sent invalid JSON: {exc}") from exc

    async def read(self, limit: int = MAX_JSON_BYTES) -> bytes:
        if self._prefetched is not None and len(self._prefetched) <= limit:
            return self._prefetched
        length = self._resp.content_length
        if length is not None and length <= limit:
            # The common case (a JSON reply with its length): one read, one deadline.
            try:
                async with asyncio.timeout(self._timeouts.idle_s):
                    return await self._resp.read()
            except TimeoutError:
                raise EngineTimeoutError(
                    f"engine sent nothing for {self._timeouts.idle_s:g} s (idle timeout)"
                ) from None
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise EngineNetworkError(
                    f"engine connection broke mid-response: {exc}") from exc
        return b"".join([chunk async for chunk in self.iter_chunks(max_bytes=limit)])

    async def iter_chunks(self, *, max_bytes: int | None = None) -> AsyncIterator[bytes]:
        """Body chunks as they arrive, with the idle timeout between them and the overall
        stream limits. aiohttp errors become FLM engine errors here."""
        limit = self._timeouts.max_stream_bytes if max_bytes is None else max_bytes
        loop = asyncio.get_running_loop()
        end = loop.time() + self._timeouts.max_stream_s
        idle = self._timeouts.idle_s
        total = 0
        content = self._resp.content
        try:
            async with asyncio.timeout(None) as deadline:
                while True:
                    deadline.reschedule(min(loop.time() + idle, end))
                    chunk = await content.readany()
                    if not chunk:
                        return
                    total += len(chunk)
                    if total > limit:
                        raise EngineApiError(f"engine response exceeded {limit} bytes")
                    deadline.reschedule(None)
                    yield chunk
        except TimeoutError:
            if loop.time() >= end:
                raise EngineTimeoutError(
                    f"engine stream exceeded {self._timeouts.max_stream_s:.0f} s"
                ) from None
            raise EngineTimeoutError(f"engine sent nothing for {idle:g} s (idle timeout)") from None
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientConnectionError,
        ) as exc:
            raise EngineNetworkError(f"engine connection broke mid-response: {exc}") from exc

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        """Drop the connection (used when the client went away mid-stream)."""
        self._resp.close()

    def finish(self, complete: bool) -> None:
        """A body read to its end goes back to the pool; anything else drops the connection,
        so the engine stops generating at once."""
        if complete:
            self._resp.release()
        else:
            self._resp.close()


class EngineClient:
    """One pooled aiohttp session per engine base URL.

    ``connector`` is used as is (once: the session owns it); ``connector_factory`` is called each
    time a session is created, inside the running loop (the egress layer's SOCKS connectors must be
    made there) and may return ``None`` for the ordinary direct connector.
    """

    def __init__(
        self,
        base_url: str,
        timeouts: Timeouts | None = None,
        connector: aiohttp.BaseConnector | None = None,
        limit: int = 256,
        connector_factory: Callable[[], aiohttp.BaseConnector | None] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.timeouts = timeouts or Timeouts()
        self._connector = connector
        self._connector_factory = connector_factory
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            made = self._connector_factory() if self._connector_factory is not None else None
            connector = made or self._connector or aiohttp.TCPConnector(
                limit=self._limit,
                keepalive_timeout=30,
                enable_cleanup_closed=False,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect_s),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                headers=self._auth,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | aiohttp.FormData | None = None,
        headers: dict[str, str] | None = None,
        first_byte_s: float | None = None,
        check_status: bool = True,
        read: bool = False,
    ) -> UpstreamResponse:
        """Send a request and wait (bounded) for the response headers; with ``read``, a body
        of known length (up to ``MAX_JSON_BYTES``) is read under the same deadline."""
        session = self._get_session()
        url = self.base_url + path
        body = data
        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":")).encode()
            hdrs["Content-Type"] = "application/json"
        wait = self.timeouts.first_byte_s if first_byte_s is None else first_byte_s
        try:
            prefetched: bytes | None = None
            async with asyncio.timeout(wait):
                resp = await session.request(
                    method, url, data=body, headers=hdrs, allow_redirects=False
                )
                length = resp.content_length
                if read and length is not None and length <= MAX_JSON_BYTES:
                    prefetched = await resp.read()
        except TimeoutError:
            raise EngineTimeoutError(
                f"engine at {self.base_url} did not answer within {wait:g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise EngineNetworkError(
                f"cannot connect to engine at {self.base_url}: {exc.os_error or exc}"
            ) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise EngineNetworkError(
                f"engine at {self.base_url} closed the connection: {exc}"
            ) from exc
        except aiohttp.ClientResponseError as exc:
            raise EngineApiError(
                f"engine at {self.base_url} sent a bad response: {exc.message}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise EngineNetworkError(f"engine request failed: {exc}") from exc
        except Exception as exc:
            from flm.egress.connector import PROXY_EXCEPTIONS

            if isinstance(exc, PROXY_EXCEPTIONS):
                raise EngineNetworkError(
                    f"cannot reach engine at {self.base_url} through the egress proxy: {exc}"
                ) from exc
            raise
        if FLM_PROXY_HEADER in resp.headers:
            resp.release()
            raise FlmListenerError(f"{self.base_url} is an FLM proxy, not an engine")
        upstream = UpstreamResponse(resp, self.timeouts, prefetched)
        if check_status and resp.status >= 400:
            try:
                body_bytes = await upstream.read(64 * 1024)
            except EngineError:
                body_bytes = b""
            finally:
                upstream.release()
            raise _status_error(resp.status, _error_message(body_bytes))
        return upstream

    async def get_json(
        self, path: str, *, first_byte_s: float | None = None, limit: int = MAX_JSON_BYTES
    ) -> Any:
        resp = await self.request("GET", path, first_byte_s=first_byte_s)
        try:
            return await resp.read_json(limit)
        finally:
            resp.release()

    async def post_json(self, path: str, body: Any, *, limit: int = MAX_JSON_BYTES) -> Any:
        resp = await self.request("POST", path, json_body=body)
        try:
            return await resp.read_json(limit)
        finally:
            resp.release()
