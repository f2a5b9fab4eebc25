"""``flm chat``: talk to a running proxy over HTTP, like any client would."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from flm.cli.output import Result
from flm.core.errors import FlmError, UsageError
from flm.services.context import Context

_IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp"}


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", help="send a prompt through a running proxy", parents=[common])
    p.add_argument("--model", required=True, help="flm://engine/model")
    p.add_argument("--prompt", help="the user message")
    p.add_argument("--prompt-file", help="read the user message from a file")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="attach a PNG/JPEG/WebP image (repeatable)")
    p.add_argument("--image-url", action="append", default=[], metavar="URL")
    p.add_argument("--audio", metavar="FILE", help="attach audio (engines with audio input)")
    p.add_argument("--json", action="store_true", help="ask for a JSON object reply")
    p.add_argument("--responses", action="store_true", help="use /v1/responses")
    p.add_argument("--modalities", default="text", help="e.g. text or text,audio")
    p.add_argument("--save-audio", metavar="FILE", help="where to write audio output")
    p.add_argument("--url", help="proxy base URL (default: the running proxy)")
    p.add_argument("--api-key", help="API key (default: $FLM_API_KEY)")
    p.set_defaults(handler=chat)


def _proxy_url(ctx: Context, explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    from flm.services.proxy import ProxyService

    proxies = ProxyService(ctx.storage).status()["proxies"]
    if proxies:
        return str(proxies[0]["endpoints"][0])
    return f"http://127.0.0.1:{ctx.config.value('proxy.port')}"


def _content(args: argparse.Namespace) -> str | list[dict[str, Any]]:
    import base64
    import mimetypes

    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read {args.prompt_file}: {exc}") from None
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise UsageError("give --prompt or --prompt-file")
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if any(m not in ("text", "audio") for m in modalities):
        raise UsageError(f"unknown modality in {args.modalities!r} (text, audio)")
    if "audio" in modalities and not args.save_audio:
        raise UsageError("--modalities audio needs --save-audio FILE")
    parts: list[dict[str, Any]] = []
    for image in args.image:
        path = Path(image)
        mime = mimetypes.guess_type(path.name)[0] or ""
        if mime not in _IMAGE_TYPES:
            raise UsageError(f"{image}: only PNG, JPEG or WebP images can be sent")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {image}: {exc}") from None
        if len(data) > 8 * 1024 * 1024:
            raise UsageError(f"{image} is larger than 8 MB")
        parts.append({"type": "image_url", "image_url": {
            "url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}})
    for url in args.image_url:
        if not url.startswith("https://"):
            raise UsageError("--image-url must be an https:// URL")
        parts.append({"type": "image_url", "image_url": {"url": url}})
    if args.audio:
        fmt = Path(args.audio).suffix.lstrip(".").lower()
        if fmt not in ("wav", "mp3", "flac", "ogg", "m4a"):
            raise UsageError("--audio must be WAV, MP3, FLAC, OGG or M4A")
        try:
            raw = Path(args.audio).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.audio}: {exc}") from None
        parts.append({"type": "input_audio", "input_audio": {
            "data": base64.b64encode(raw).decode(), "format": fmt}})
    if not parts:
        return text
    return [{"type": "text", "text": text}, *parts]


def _post(url: str, key: str, body: dict[str, Any]) -> Any:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - the URL is the user's proxy
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return opener.open(request, timeout=300)
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())["error"]
            raise FlmError(f"HTTP {exc.code}: {err['message']} (request {err.get('request_id')})",
                           code=str(err.get("code", "HTTP_ERROR")).upper()) from None
        except (ValueError, KeyError, TypeError):
            raise FlmError(f"proxy answered HTTP {exc.code}", code="HTTP_ERROR") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FlmError(f"cannot reach the proxy at {url}: {exc}; is it running "
                       "(`flm proxy status`)?", code="PROXY_NOT_RUNNING") from None


def chat(ctx: Context, args: argparse.Namespace) -> Result:
    key = args.api_key or os.environ.get("FLM_API_KEY")
    if not key:
        raise UsageError("give --api-key or set FLM_API_KEY")
    content = _content(args)
    base = _proxy_url(ctx, args.url)
    if args.responses:
        resp = _post(f"{base}/v1/responses", key, {"model": args.model, "input": [
            {"role": "user", "content": content if isinstance(content, list) else
             [{"type": "input_text", "text": content}]}]})
        with resp:
            reply = json.loads(resp.read())
        text = "".join(c.get("text", "") for item in reply.get("output", [])
                       for c in item.get("content", []))
        return Result({"text": text, "response": reply,
                       "request_id": resp.headers.get("x-request-id")}, text=lambda d: d["text"])
    body: dict[str, Any] = {"model": args.model,
                            "messages": [{"role": "user", "content": content}]}
    if args.json:
        body["response_format"] = {"type": "json_object"}
    if args.modalities != "text":
        body["modalities"] = args.modalities.split(",")
    if not args.stream:
        resp = _post(f"{base}/v1/chat/completions", key, body)
        with resp:
            reply = json.loads(resp.read())
        text = reply["choices"][0]["message"].get("content") or ""
        return Result({"text": text, "usage": reply.get("usage"),
                       "request_id": resp.headers.get("x-request-id")}, text=lambda d: d["text"])
    body["stream"] = True
    resp = _post(f"{base}/v1/chat/completions", key, body)
    pieces: list[str] = []
    fmt_text = getattr(args, "format", "json") == "text"
    with resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                raise FlmError(str(event["error"].get("message")), code="ENGINE_API_ERROR")
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                pieces.append(piece)
                if fmt_text:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    text = "".join(pieces)
    return Result({"text": text, "request_id": resp.headers.get("x-request-id")},
                  text=lambda d: "")
