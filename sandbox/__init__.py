"""Sandbox LLM provider: a real OpenAI-compatible HTTP server for dev and tests."""

from sandbox.server import SandboxConfig, SandboxProvider, count_tokens

__all__ = ["SandboxConfig", "SandboxProvider", "count_tokens"]
