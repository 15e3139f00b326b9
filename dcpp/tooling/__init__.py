"""Tooling for tests, benchmarks, the demo and the CLI (not used by a serving engine): the vLLM
engine and server harness (`harness`), the streaming load client (`load_client`), vLLM's
scheduler driven with no model (`offline`), and stand-ins for an engine around dcpp's runtime
(`fake_engine`: one fake executor, configs, requests, schedulers)."""
