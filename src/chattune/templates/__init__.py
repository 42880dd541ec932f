"""Prompt templates: one spec per template, rendered as pieces, Jinja and Ollama's TEMPLATE;
the tool-call format and the catalog."""
