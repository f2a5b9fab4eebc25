"""The ASGI gateway: pure ASGI middleware, routes, and the runtime they share."""
