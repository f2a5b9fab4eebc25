"""The OpenAI wire format: SSE framing, error bodies, request translation (pure functions)."""
