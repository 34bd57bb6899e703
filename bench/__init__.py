"""Benchmarks: each prints a table and ends with a headline ratio against plain diffusers."""

import os

# transformers warns at import time about image backends Stable Diffusion never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
