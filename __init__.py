"""kvrelay: LLM batch inference for HPC clusters."""

__version__ = "0.1.0"
