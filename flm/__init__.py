"""FLM: publish the LLM engines on your own machine as one safe, fast, OpenAI-compatible API."""

__version__ = "0.1.0"
