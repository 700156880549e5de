"""MiniMind-V-style vision-language model trainer (see README.md)."""

__version__ = "0.1.0"
