"""Inference: load a run, build and decode batches, sample, stream text."""
