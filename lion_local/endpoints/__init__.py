"""The endpoint layer: one OpenAI-compatible client, and the servers a run starts behind it.

client.py speaks HTTP to any OpenAI-compatible server (vLLM, `transformers serve`, a hosted
API); servers.py decides which of the config's servers run when, starting them through the
top-level `serving` package; access.py holds the rules for their keys, launchers and model
directories; journaled.py runs many calls at once, journaling each result as it arrives.
Nothing here knows about stages.
"""
