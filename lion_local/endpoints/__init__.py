"""The endpoint layer: one OpenAI-compatible client, and the servers a run starts behind it.

client.py speaks HTTP to any OpenAI-compatible server (vLLM, `transformers serve`, a hosted
API); servers.py decides which of the config's servers run when, starting them through the
top-level `serving` package. Nothing here knows about stages or the run directory.
"""
