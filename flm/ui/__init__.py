"""The web UI served by the daemon (see flm.ui.app)."""
