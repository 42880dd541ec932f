"""chattune: fine-tune chat LLMs on instruction data and use the result."""

__version__ = "0.1.0"
