"""Data: read and validate records, render templates, encode, cache."""
