"""Instructions per request of FLM's gateway: a figure a busy machine does not move.

Runs ``hotpath.py`` (the real gateway between fake transports: every security layer, the
router, the engine client, the audit and usage threads; no sockets) under
``valgrind --tool=callgrind`` twice, with ``--requests`` N1 and N2, and prints
(instructions of the second run − instructions of the first) / (N2 − N1): the instructions
one request costs the process, its helper threads included, start-up and warm-up cancelled
out. Repeated runs agree to a fraction of a percent, where CPU time on a shared machine moves
by tens of percent.

``--scoped``: the key has every per-key setting on (see hotpath.py); the difference to a run
without it is what the key's checks, the ledger and the ``x-ratelimit-*`` headers cost.
``--pythonpath DIR``: run another tree's ``flm`` package (e.g. an older commit's
``git archive`` output) with this tree's harness. The two runs (N1 and N2 requests) go in parallel.

Run: ``.venv/bin/python bench/instructions.py [--scoped] [--requests 200,1200]``. Needs the
Debian package valgrind. Not part of the test suite. (Wall time: a few minutes; valgrind runs
Python about fifty times slower.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def count(requests: int, scoped: bool, pythonpath: str | None, workdir: Path) -> int:
    out = workdir / f"cg-{requests}-{int(scoped)}-{abs(hash(pythonpath))}.out"
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(BENCH / "hotpath.py"),
        "--requests",
        str(requests),
        *(["--scoped"] if scoped else []),
    ]
    # (run from the work folder: the current directory must not shadow PYTHONPATH's flm)
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"hotpath.py under valgrind failed: {done.stderr[-2000:]}")
    match = re.search(r"^summary: (\d+)$", out.read_text(errors="replace"), re.MULTILINE)
    if match is None:
        raise SystemExit(f"no instruction total in {out}")
    return int(match[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", default="200,1200", help="N1,N2 (default 200,1200)")
    ap.add_argument("--scoped", action="store_true")
    ap.add_argument("--pythonpath", default=None, help="import flm from this folder")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (Debian package valgrind)")
    n1, n2 = (int(n) for n in args.requests.split(","))
    with tempfile.TemporaryDirectory(prefix="flm-instr-") as tmp, ThreadPoolExecutor(2) as pool:
        first, second = pool.map(
            lambda n: count(n, args.scoped, args.pythonpath, Path(tmp)), (n1, n2)
        )
    per = (second - first) / (n2 - n1)
    what = "scoped key" if args.scoped else "key without settings"
    print(f"{per:,.0f} instructions per request ({what}; {n1} and {n2} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
