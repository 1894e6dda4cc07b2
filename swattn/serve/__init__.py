"""``swattn serve``: an OpenAI-compatible server with continuous batching over ring caches."""
