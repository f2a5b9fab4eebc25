"""Use cases shared by the CLI, the daemon and the web UI. No HTTP and no argparse here."""
