"""`flm chat` through a real gateway in front of an emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flm.testing.emulators import ModelSpec, expected_reply, start_emulator
from flm.testing.gateway import start_gateway


def test_chat_plain_stream_responses_and_refusals(cli: Any, tmp_path: Path) -> None:
    with start_emulator("ollama", models=["m:1", ModelSpec("eye:1", vision=True)]) as emu:
        cli("engines", "add", "--kind", "ollama", "--url", emu.url, "--id", "o")
        key = cli("api-keys", "create", "--label", "c").data["key"]
        with start_gateway() as gw:
            common = ["--url", gw.url, "--api-key", key]
            plain = cli("chat", "--model", "flm://o/m:1", "--prompt", "hi you", *common)
            assert plain.code == 0, plain.out
            assert plain.data["text"] == expected_reply("hi you") and plain.data["request_id"]
            streamed = cli(
                "chat",
                "--model",
                "flm://o/m:1",
                "--prompt",
                "go on",
                "--stream",
                *common,
                "--format",
                "text",
            )
            assert streamed.out.strip() == expected_reply("go on")
            prompt = tmp_path / "p.txt"
            prompt.write_text("from a file")
            via_responses = cli(
                "chat",
                "--model",
                "flm://o/m:1",
                "--prompt-file",
                str(prompt),
                "--responses",
                *common,
            )
            assert via_responses.data["text"] == expected_reply("from a file")
            image = tmp_path / "x.png"
            image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
            seen = cli(
                "chat",
                "--model",
                "flm://o/eye:1",
                "--prompt",
                "look",
                "--image",
                str(image),
                *common,
            )
            assert "[images: 1]" in seen.data["text"]
            # the Responses API takes the same inputs, in its own part shapes, and streams
            looked = cli(
                "chat",
                "--model",
                "flm://o/eye:1",
                "--prompt",
                "look",
                "--image",
                str(image),
                "--responses",
                *common,
            )
            assert looked.code == 0, looked.out
            assert "[images: 1]" in looked.data["text"]
            assert looked.data["response"]["object"] == "response"
            flowing = cli(
                "chat",
                "--model",
                "flm://o/m:1",
                "--prompt",
                "flow on",
                "--stream",
                "--responses",
                *common,
            )
            assert flowing.code == 0, flowing.out
            assert flowing.data["text"] == expected_reply("flow on")
            assert flowing.data["response"]["status"] == "completed"
            shown = cli(
                "chat",
                "--model",
                "flm://o/m:1",
                "--prompt",
                "show me",
                "--stream",
                "--responses",
                *common,
                "--format",
                "text",
            )
            assert shown.out.strip() == expected_reply("show me")
            refused = cli(
                "chat", "--model", "flm://o/m:1", "--prompt", "look", "--image", str(image), *common
            )
            assert refused.code == 1 and refused.error["code"] == "UNSUPPORTED_MODALITIES"
            before = len(emu.requests)
            bad = [
                ("--image", str(tmp_path / "x.gif")),
                ("--image-url", "http://x/y.png"),
                ("--modalities", "text,audio"),
                ("--audio", str(tmp_path / "a.xyz")),
            ]
            audio = tmp_path / "a.wav"
            audio.write_bytes(b"RIFF0000WAVE")
            for extra in (
                ["--audio", str(audio), "--responses"],
                ["--modalities", "text,audio", "--save-audio", str(tmp_path / "o.wav"), "--stream"],
            ):
                result = cli("chat", "--model", "flm://o/m:1", "--prompt", "x", *extra, *common)
                assert result.code == 1 and result.error["code"] == "INVALID_ARGUMENT", extra
            for flag, value in bad:
                result = cli(
                    "chat", "--model", "flm://o/m:1", "--prompt", "x", flag, value, *common
                )
                assert result.code == 1 and result.error["code"] == "INVALID_ARGUMENT", flag
            assert len(emu.requests) == before  # refused before anything was sent
            wrong = cli(
                "chat",
                "--model",
                "flm://o/m:1",
                "--prompt",
                "x",
                "--url",
                gw.url,
                "--api-key",
                "flm_0000000000000000_" + "a" * 43,
            )
            assert wrong.code == 1 and wrong.error["code"] == "INVALID_API_KEY"


def test_save_audio_writes_the_replys_audio_privately(tmp_path: Path) -> None:
    import base64
    import stat

    import pytest

    from flm.cli.chat import _save_audio
    from flm.core.errors import FlmError

    target = tmp_path / "out" / "reply.wav"
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt "
    assert _save_audio({"audio": {"data": base64.b64encode(wav).decode()}}, str(target)) == str(
        target
    )
    assert target.read_bytes() == wav and stat.S_IMODE(target.stat().st_mode) == 0o600
    for message in ({"content": "no audio"}, {"audio": {"data": "***"}}):
        with pytest.raises(FlmError):
            _save_audio(message, str(tmp_path / "never.wav"))
    assert not (tmp_path / "never.wav").exists()
