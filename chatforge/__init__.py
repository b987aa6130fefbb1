"""chatforge: build a ChatGPT-like assistant from raw web pages, end to end."""

__version__ = "0.1.0"
