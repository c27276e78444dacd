"""parallama: a concurrency and throughput layer for local LLM serving."""

__version__ = "0.1.0"
