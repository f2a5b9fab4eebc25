"""One example line per command, shown at the end of its ``--help`` (a test checks that every
command has one and that each example parses as that command)."""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, str] = {
    "": "flm up",
    "up": "flm up --model demo --port 8080",
    "engines": "flm engines list",
    "engines detect": "flm engines detect --fresh",
    "engines list": "flm engines list",
    "engines add": "flm engines add --kind vllm --url http://gpu-box:8000 --id gpu",
    "engines remove": "flm engines remove gpu",
    "engines start": "flm engines start llamacpp --model demo",
    "engines stop": "flm engines stop llamacpp",
    "engines install": "flm engines install llamacpp",
    "models": "flm models list",
    "models list": "flm models list --engine ollama",
    "models alias": "flm models alias list",
    "models alias set": "flm models alias set gpt-4o-mini flm://ollama/llama3.2:1b",
    "models alias list": "flm models alias list",
    "models alias remove": "flm models alias remove gpt-4o-mini",
    "proxy": "flm proxy status",
    "proxy start": "flm proxy start --port 8080",
    "proxy stop": "flm proxy stop --port 8080",
    "proxy status": "flm proxy status",
    "proxy renew": "flm proxy renew --if-due",
    "proxy reload": "flm proxy reload --all",
    "chat": "flm chat --model llama3.2:1b --prompt 'Hello!'",
    "config": "flm config list",
    "config get": "flm config get proxy.port",
    "config set": "flm config set proxy.port 8081",
    "config list": "flm config list",
    "api-keys": "flm api-keys list",
    "api-keys create": "flm api-keys create --label laptop",
    "api-keys list": "flm api-keys list",
    "api-keys revoke": "flm api-keys revoke 3f2a9c",
    "api-keys rotate": "flm api-keys rotate 3f2a9c",
    "api-keys update": "flm api-keys update 3f2a9c --rpm 60 --models 'flm://ollama/*'",
    "secrets": "flm secrets dns list",
    "secrets dns": "flm secrets dns list",
    "secrets dns add": "flm secrets dns add home --provider cloudflare --zone example.org "
    "--api-token-file token.txt",
    "secrets dns list": "flm secrets dns list",
    "secrets dns remove": "flm secrets dns remove home",
    "usage": "flm usage --since 24h --by model",
    "security": "flm security policy show",
    "security install-ca": "flm security install-ca --dry-run",
    "security uninstall-ca": "flm security uninstall-ca --dry-run",
    "security policy": "flm security policy show",
    "security policy show": "flm security policy show",
    "security policy set": "flm security policy set --file policy.json",
    "security backup": "flm security backup create",
    "security backup create": "flm security backup create --output /srv/backups",
    "security backup restore": "flm security backup restore --file security.db.bak.20260101",
    "security ip-blocklist": "flm security ip-blocklist list",
    "security ip-blocklist list": "flm security ip-blocklist list",
    "security ip-blocklist unblock": "flm security ip-blocklist unblock 203.0.113.7",
    "security ip-blocklist clear": "flm security ip-blocklist clear",
    "security audit-logs": "flm security audit-logs export --format csv --output audit.csv",
    "security audit-logs export": "flm security audit-logs export --format csv --output a.csv",
    "security audit-logs archive": "flm security audit-logs archive --before 2026-01-01",
    "security intrusion": "flm security intrusion --min-score 50",
    "security anomaly": "flm security anomaly --limit 20",
    "model-profiles": "flm model-profiles list",
    "model-profiles list": "flm model-profiles list --engine ollama",
    "model-profiles save": "flm model-profiles save --engine ollama --model llama3.2:1b "
    "--label cool --params params.json",
    "model-profiles delete": "flm model-profiles delete --id 3f2a9c",
    "api": "flm api prompts list",
    "api prompts": "flm api prompts list",
    "api prompts list": "flm api prompts list",
    "api prompts show": "flm api prompts show --api-id chat_completions",
    "api prompts delete": "flm api prompts delete --api-id chat_completions",
    "api prompts set": "flm api prompts set --api-id chat_completions --file prompt.txt",
    "engines pool": "flm engines pool list",
    "engines pool create": "flm engines pool create gpus --member ollama ollama-2 "
    "--weight ollama-2=2",
    "engines pool list": "flm engines pool list",
    "engines pool remove": "flm engines pool remove gpus",
    "security exposure": "flm security exposure",
    "security alerts": "flm security alerts test",
    "security alerts test": "flm security alerts test",
    "completion": "flm completion bash",
    "migrate": "flm migrate legacy plan --source ~/old-flm",
    "migrate legacy": "flm migrate legacy plan --source ~/old-flm",
    "migrate legacy plan": "flm migrate legacy plan --source ~/old-flm --tmp /tmp/flm-migration",
    "migrate legacy convert": "flm migrate legacy convert --source ~/old-flm",
    "migrate legacy apply": "flm migrate legacy apply --source ~/old-flm --confirm",
    "service": "flm service status",
    "service install": "flm service install --port 8080",
    "service status": "flm service status",
    "service uninstall": "flm service uninstall",
    "ui": "flm ui --no-browser",
    "check": "flm check --verbose",
}


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser under ``parser`` with its command path, ``parser`` itself first."""
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out += walk(child, (*path, name))
    return out


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Put each command's example line at the end of its help."""
    for path, sub in walk(parser):
        example = EXAMPLES.get(" ".join(path))
        if example is None:
            continue
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        sub.epilog = (sub.epilog + "\n\n" if sub.epilog else "") + f"example:\n  {example}"
