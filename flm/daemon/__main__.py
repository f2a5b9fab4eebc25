from flm.daemon.main import run

raise SystemExit(run())
