"""Evaluation: metrics, the eval command and the HTML report."""
