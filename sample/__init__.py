"""Samplers (one per file), guidance wrappers around the denoiser, generation and dataset synthesis."""
