"""phijax.serve: a phi model behind an OpenAI-compatible HTTP API, with continuous batching.

engine.py (the batching engine over one KV cache), text.py (streamed text and stop sequences),
protocol.py (the OpenAI wire format), server.py (HTTP + the `python -m phijax.serve` command).
docs/serving.md explains the design and the benchmark.
"""
