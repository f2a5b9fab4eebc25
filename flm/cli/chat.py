"""``flm chat``: talk to a running proxy over HTTP, like any client would."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from flm.cli.output import Result
from flm.core.errors import FlmError, ProxyError, UsageError
from flm.services.context import Context

_IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp"}


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", help="send a prompt through a running proxy", parents=[common])
    p.add_argument(
        "--model", required=True, help="flm://engine/model, a plain model name, or an alias"
    )
    p.add_argument("--prompt", help="the user message")
    p.add_argument("--prompt-file", help="read the user message from a file")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="attach a PNG/JPEG/WebP image (repeatable)",
    )
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

    proxies = ProxyService(ctx.storage).status()["proxies"]  # the daemon's and --no-daemon ones
    if proxies:
        return str(proxies[0]["endpoints"][0]).rstrip("/")
    raise ProxyError(
        "no FLM proxy is running: start one (`flm up` or `flm proxy start`), or give --url",
        code="PROXY_NOT_RUNNING",
    )


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
        parts.append(
            {
                "type": "image_url",
                "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"},
            }
        )
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
        parts.append(
            {
                "type": "input_audio",
                "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt},
            }
        )
    if not parts:
        return text
    return [{"type": "text", "text": text}, *parts]


def _post(url: str, key: str, body: dict[str, Any]) -> Any:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - the URL is the user's proxy
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return opener.open(request, timeout=300)
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())["error"]
            raise FlmError(
                f"HTTP {exc.code}: {err['message']} (request {err.get('request_id')})",
                code=str(err.get("code", "HTTP_ERROR")).upper(),
            ) from None
        except (ValueError, KeyError, TypeError):
            raise FlmError(f"proxy answered HTTP {exc.code}", code="HTTP_ERROR") from None
        finally:
            exc.close()  # (the error holds the connection: close it now, not at collection)
    except (urllib.error.URLError, OSError) as exc:
        raise FlmError(
            f"cannot reach the proxy at {url}: {exc}; is it running (`flm proxy status`)?",
            code="PROXY_NOT_RUNNING",
        ) from None


def _responses_content(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat content parts in the Responses API's input shapes."""
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    parts: list[dict[str, Any]] = []
    for part in content:
        if part["type"] == "text":
            parts.append({"type": "input_text", "text": part["text"]})
        elif part["type"] == "image_url":
            parts.append({"type": "input_image", "image_url": part["image_url"]["url"]})
        else:
            raise UsageError("--audio cannot be sent with --responses (use chat completions)")
    return parts


def _sse_data(resp: Any) -> Any:
    """The JSON ``data`` payloads of an SSE reply, up to ``[DONE]`` or its end."""
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        event = json.loads(payload)
        if isinstance(event, dict) and "error" in event:
            err = event["error"] if isinstance(event["error"], dict) else {}
            raise FlmError(str(err.get("message") or event["error"]), code="ENGINE_API_ERROR")
        yield event


def _show(piece: str, args: argparse.Namespace) -> None:
    if getattr(args, "format", "json") == "text":
        sys.stdout.write(piece)
        sys.stdout.flush()


def _responses(
    base: str, key: str, args: argparse.Namespace, content: str | list[dict[str, Any]]
) -> Result:
    body: dict[str, Any] = {
        "model": args.model,
        "input": [{"role": "user", "content": _responses_content(content)}],
    }
    if args.json:
        body["text"] = {"format": {"type": "json_object"}}
    if not args.stream:
        resp = _post(f"{base}/v1/responses", key, body)
        with resp:
            reply = json.loads(resp.read())
        text = "".join(
            c.get("text", "")
            for item in reply.get("output", [])
            for c in item.get("content", []) or []
        )
        return Result(
            {"text": text, "response": reply, "request_id": resp.headers.get("x-request-id")},
            text=lambda d: d["text"],
        )
    body["stream"] = True
    resp = _post(f"{base}/v1/responses", key, body)
    pieces: list[str] = []
    final: Any = None
    with resp:
        for event in _sse_data(resp):
            kind = event.get("type")
            if kind == "response.output_text.delta":
                pieces.append(str(event.get("delta") or ""))
                _show(pieces[-1], args)
            elif kind in ("response.completed", "response.incomplete"):
                final = event.get("response")
    return Result(
        {
            "text": "".join(pieces),
            "response": final,
            "request_id": resp.headers.get("x-request-id"),
        },
        text=lambda d: "",
    )


def chat(ctx: Context, args: argparse.Namespace) -> Result:
    key = args.api_key or os.environ.get("FLM_API_KEY")
    if not key:
        raise UsageError("give --api-key or set FLM_API_KEY")
    content = _content(args)
    audio_out = "audio" in args.modalities.split(",")
    if audio_out and (args.stream or args.responses):
        raise UsageError(
            "--save-audio works with plain chat completions (no --stream, no --responses)"
        )
    base = _proxy_url(ctx, args.url)
    if args.responses:
        return _responses(base, key, args, content)
    body: dict[str, Any] = {"model": args.model, "messages": [{"role": "user", "content": content}]}
    if args.json:
        body["response_format"] = {"type": "json_object"}
    if args.modalities != "text":
        body["modalities"] = args.modalities.split(",")
    if audio_out:
        body["audio"] = {"voice": "alloy", "format": "wav"}
    if not args.stream:
        resp = _post(f"{base}/v1/chat/completions", key, body)
        with resp:
            reply = json.loads(resp.read())
        message = reply["choices"][0]["message"]
        text = message.get("content") or ""
        result: dict[str, Any] = {
            "text": text,
            "usage": reply.get("usage"),
            "request_id": resp.headers.get("x-request-id"),
        }
        if audio_out:
            result["audio_file"] = _save_audio(message, args.save_audio)
            text = text or (message.get("audio") or {}).get("transcript") or ""
            result["text"] = text
        return Result(result, text=lambda d: d["text"])
    body["stream"] = True
    resp = _post(f"{base}/v1/chat/completions", key, body)
    pieces: list[str] = []
    with resp:
        for event in _sse_data(resp):
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                pieces.append(piece)
                _show(piece, args)
    text = "".join(pieces)
    return Result({"text": text, "request_id": resp.headers.get("x-request-id")}, text=lambda d: "")


def _save_audio(message: dict[str, Any], path: str) -> str:
    """Write the reply's audio (base64 in ``message.audio.data``) to ``path``, 0600."""
    import base64
    import binascii

    from flm.core.paths import write_private_file

    audio = message.get("audio")
    data = audio.get("data") if isinstance(audio, dict) else None
    if not isinstance(data, str) or not data:
        raise FlmError("the reply carries no audio", code="ENGINE_API_ERROR")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FlmError("the reply's audio is not valid base64", code="ENGINE_API_ERROR") from None
    write_private_file(Path(path), raw)
    return path
