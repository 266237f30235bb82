"""Agents: tool calling in the Hermes/Qwen format, built-in tools, the ReAct loop, traces and guardrails.
Import the submodules directly."""
