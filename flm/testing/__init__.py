"""Test doubles shipped with FLM so users can use them too: engine emulators, helpers."""
