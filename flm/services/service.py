"""Running the gateway at login under the platform's service manager.

Linux: a systemd *user* unit (``$XDG_CONFIG_HOME/systemd/user/flm.service``) running
``flm proxy start --no-daemon`` in the foreground, restarted on failure, logging to the journal,
``systemctl --user reload`` sending SIGHUP (which reloads policy, keys and engines).
macOS: a launchd agent (``~/Library/LaunchAgents/dev.flm.gateway.plist``, KeepAlive on failure).
Windows: a Scheduled Task (Task Scheduler XML: at logon, restart on failure, no time limit).

Files are generated for any platform (``--platform``, to show or copy); they are installed and
enabled only on the platform they are for. The service-manager calls go through an injectable
runner, and are skipped with a note when there is no manager to talk to (no user bus).
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from flm.core.errors import FlmError, UsageError
from flm.core.paths import Paths

UNIT_NAME = "flm.service"
LAUNCHD_LABEL = "dev.flm.gateway"
TASK_NAME = "FLM gateway"
PLATFORMS = ("linux", "macos", "windows")

#: Runs a service-manager command: argv -> (exit code, combined output).
Runner = Callable[[Sequence[str]], tuple[int, str]]


def current_platform() -> str:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform == "win32":
        return "windows"
    return "linux"


def run_command(argv: Sequence[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


@dataclass(frozen=True)
class ServiceSpec:
    port: int
    bind: str
    mode: str
    home: Path
    python: str = sys.executable

    def argv(self) -> list[str]:
        return [
            self.python,
            "-m",
            "flm",
            "proxy",
            "start",
            "--no-daemon",
            "--port",
            str(self.port),
            "--bind",
            self.bind,
            "--mode",
            self.mode,
        ]


def _systemd_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./:=@+," for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(spec: ServiceSpec) -> str:
    exec_start = " ".join(_systemd_quote(a) for a in spec.argv())
    home = _systemd_quote(f"FLM_HOME={spec.home}")
    return f"""[Unit]
Description=FLM gateway: the local LLM engines as one OpenAI-compatible API
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
Environment={home}
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
TimeoutStopSec=30
StandardOutput=journal
StandardError=journal
UMask=0077
NoNewPrivileges=yes

[Install]
WantedBy=default.target
"""


def launchd_plist(spec: ServiceSpec) -> bytes:
    logs = spec.home / "logs"
    document = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": spec.argv(),
        "EnvironmentVariables": {"FLM_HOME": str(spec.home)},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 5,
        "ProcessType": "Background",
        "Umask": 0o077,
        "StandardOutPath": str(logs / "service.out.log"),
        "StandardErrorPath": str(logs / "service.err.log"),
    }
    return plistlib.dumps(document)


def _windows_quote(arg: str) -> str:
    return f'"{arg}"' if (" " in arg or not arg) else arg


def task_xml(spec: ServiceSpec) -> str:
    argv = spec.argv()
    command = escape(argv[0])
    arguments = escape(" ".join(_windows_quote(a) for a in argv[1:]))
    return f"""<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.4" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>FLM gateway: the local LLM engines as one OpenAI-compatible API</Description>
  </RegistrationInfo>
  <Triggers>
    <LogonTrigger><Enabled>true</Enabled></LogonTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <LogonType>InteractiveToken</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>999</Count>
    </RestartOnFailure>
    <Enabled>true</Enabled>
    <Hidden>false</Hidden>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{command}</Command>
      <Arguments>{arguments}</Arguments>
    </Exec>
  </Actions>
</Task>
"""


def service_path(platform: str, env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home())
    if platform == "linux":
        base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
        return base / "systemd" / "user" / UNIT_NAME
    if platform == "macos":
        return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    appdata = Path(env.get("APPDATA") or home / "AppData" / "Roaming")
    return appdata / "flm" / "flm-task.xml"


def render(platform: str, spec: ServiceSpec) -> bytes:
    if platform == "linux":
        return systemd_unit(spec).encode()
    if platform == "macos":
        return launchd_plist(spec)
    return task_xml(spec).encode("utf-8")


def _user_bus_available(env: dict[str, str]) -> bool:
    runtime = env.get("XDG_RUNTIME_DIR")
    return bool(env.get("DBUS_SESSION_BUS_ADDRESS")) or bool(
        runtime and Path(runtime, "bus").exists()
    )


class ServiceManager:
    def __init__(
        self,
        paths: Paths,
        *,
        platform: str | None = None,
        runner: Runner = run_command,
        env: dict[str, str] | None = None,
    ) -> None:
        self.paths = paths
        self.platform = platform or current_platform()
        if self.platform not in PLATFORMS:
            raise UsageError(
                f"unknown platform {self.platform!r}; expected one of {', '.join(PLATFORMS)}"
            )
        self.runner = runner
        self.env = dict(os.environ) if env is None else env
        self.native = self.platform == current_platform()

    @property
    def path(self) -> Path:
        return service_path(self.platform, self.env)

    def _manager_ready(self) -> str | None:
        """Why the service manager cannot be asked (None: it can)."""
        if not self.native:
            return f"not on {self.platform}: the file is generated, not installed"
        if self.platform == "linux":
            if shutil.which("systemctl") is None:
                return "systemctl is not installed"
            if not _user_bus_available(self.env):
                return (
                    "no systemd user session (no user bus): enable it later with "
                    f"`systemctl --user enable --now {UNIT_NAME}`"
                )
        elif self.platform == "macos" and shutil.which("launchctl") is None:
            return "launchctl is not available"
        elif self.platform == "windows" and shutil.which("schtasks") is None:
            return "schtasks is not available"
        return None

    def _call(self, argv: list[str], notes: list[str]) -> bool:
        code, output = self.runner(argv)
        if code != 0:
            notes.append(f"`{' '.join(argv)}` failed ({code}): {output[:300]}")
            return False
        return True

    def install(self, spec: ServiceSpec, *, enable: bool = True) -> dict[str, Any]:
        content = render(self.platform, spec)
        notes: list[str] = []
        written = None
        enabled = False
        if self.native:
            path = self.path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(content)
            os.chmod(tmp, 0o600 if self.platform == "windows" else 0o644)
            tmp.replace(path)
            written = str(path)
            why = self._manager_ready() if enable else "not enabled (--no-enable)"
            if why:
                notes.append(why)
            elif self.platform == "linux":
                enabled = self._call(
                    ["systemctl", "--user", "daemon-reload"], notes
                ) and self._call(["systemctl", "--user", "enable", "--now", UNIT_NAME], notes)
                if enabled:
                    notes.append(f"logs: journalctl --user -u {UNIT_NAME} -f")
            elif self.platform == "macos":
                enabled = self._call(
                    ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(path)], notes
                )
            else:
                enabled = self._call(
                    ["schtasks", "/Create", "/F", "/TN", TASK_NAME, "/XML", str(path)], notes
                )
        else:
            notes.append(f"generated for {self.platform}; not installed on this machine")
        return {
            "platform": self.platform,
            "path": written or str(self.path),
            "installed": written is not None,
            "enabled": enabled,
            "command": spec.argv(),
            "content": content.decode("utf-8"),
            "notes": notes,
        }

    def uninstall(self) -> dict[str, Any]:
        if not self.native:
            raise UsageError(f"nothing to uninstall: this machine is not {self.platform}")
        notes: list[str] = []
        path = self.path
        why = self._manager_ready()
        if why is None and path.exists():
            if self.platform == "linux":
                self._call(["systemctl", "--user", "disable", "--now", UNIT_NAME], notes)
            elif self.platform == "macos":
                self._call(["launchctl", "bootout", f"gui/{os.getuid()}/{LAUNCHD_LABEL}"], notes)
            else:
                self._call(["schtasks", "/Delete", "/F", "/TN", TASK_NAME], notes)
        existed = path.exists()
        path.unlink(missing_ok=True)
        if why is None and existed and self.platform == "linux":
            self._call(["systemctl", "--user", "daemon-reload"], notes)
        if not existed:
            notes.append(f"no service file at {path}")
        return {"platform": self.platform, "path": str(path), "removed": existed, "notes": notes}

    def status(self) -> dict[str, Any]:
        path = self.path
        data: dict[str, Any] = {
            "platform": self.platform,
            "path": str(path),
            "installed": path.exists(),
            "active": None,
            "enabled": None,
            "notes": [],
        }
        why = self._manager_ready()
        if why is not None:
            data["notes"].append(why)
            return data
        if self.platform == "linux":
            code, out = self.runner(["systemctl", "--user", "is-active", UNIT_NAME])
            data["active"] = code == 0 and out.strip() == "active"
            code, out = self.runner(["systemctl", "--user", "is-enabled", UNIT_NAME])
            data["enabled"] = code == 0 and out.strip() == "enabled"
        elif self.platform == "macos":
            code, _out = self.runner(["launchctl", "print", f"gui/{os.getuid()}/{LAUNCHD_LABEL}"])
            data["active"] = code == 0
        else:
            code, _out = self.runner(["schtasks", "/Query", "/TN", TASK_NAME])
            data["enabled"] = code == 0
        return data


def verify_unit(path: Path, runner: Runner = run_command) -> tuple[bool, str]:
    """``systemd-analyze verify`` on a unit file: (accepted without warnings, output)."""
    if shutil.which("systemd-analyze") is None:
        raise FlmError("systemd-analyze is not installed", code="IO_ERROR")
    code, output = runner(["systemd-analyze", "verify", str(path)])
    return code == 0 and not output, output
