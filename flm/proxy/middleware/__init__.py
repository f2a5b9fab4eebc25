"""One pure-ASGI class per concern; ``flm.proxy.app.build_app`` stacks them in SPEC order."""
