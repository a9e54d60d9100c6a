"""Outputs for humans and tools: Chrome/Perfetto traces and matplotlib plots."""
