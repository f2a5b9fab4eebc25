"""Fetching ``https://`` image URLs into data URIs (≤ 10 MB, PNG/JPEG/WebP only)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp

from flm.core.errors import FlmError
from flm.openai.errors import HttpError
from flm.openai.translate import ChatPlan
from flm.proxy.runtime import ProxyRuntime

MAX_FETCHED_IMAGE = 10 * 1024 * 1024
_TYPES = {"image/png", "image/jpeg", "image/webp"}


async def fetch_image(url: str, connector: aiohttp.BaseConnector | None = None) -> str:
    timeout = aiohttp.ClientTimeout(total=30, connect=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
            session.get(url, allow_redirects=True, max_redirects=3) as resp,
        ):
            if resp.status != 200:
                raise HttpError(400, "invalid_request",
                                f"image URL answered HTTP {resp.status}")
            mime = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if mime not in _TYPES:
                raise HttpError(422, "unsupported_modalities",
                                f"image URL content type {mime or '?'} not accepted")
            data = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                data += chunk
                if len(data) > MAX_FETCHED_IMAGE:
                    raise HttpError(413, "payload_too_large",
                                    f"image URL body exceeds {MAX_FETCHED_IMAGE} bytes")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise HttpError(400, "invalid_request", f"cannot fetch image URL: {exc}") from None
    except HttpError:
        raise
    except Exception as exc:
        from flm.egress.connector import PROXY_EXCEPTIONS

        if isinstance(exc, PROXY_EXCEPTIONS):
            raise HttpError(400, "invalid_request",
                            f"cannot fetch image URL through the egress proxy: {exc}") from None
        raise
    return f"data:{mime};base64," + base64.b64encode(bytes(data)).decode("ascii")


def _egress_connector(rt: ProxyRuntime, url: str) -> aiohttp.BaseConnector | None:
    """Image fetches leave the machine through the egress in force (SPEC §7)."""
    if not rt.egress.uses_proxy:
        return None
    from flm.egress.connector import connector_for

    try:
        return connector_for(rt.egress, url)
    except FlmError as exc:
        raise HttpError(400, "invalid_request", f"bad image URL: {exc.message}") from None


async def inline_remote_images(plan: ChatPlan, rt: ProxyRuntime) -> None:
    fetched = dict(zip(plan.image_urls,
                       await asyncio.gather(*(fetch_image(u, _egress_connector(rt, u))
                                              for u in plan.image_urls)),
                       strict=True))
    for message in plan.body["messages"]:
        content: Any = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                if url in fetched:
                    part["image_url"]["url"] = fetched[url]
