"""Benchmarks: each prints a table and ends with a headline ratio against plain diffusers."""

import os

# transformers warns at import time about image backends Stable Diffusion never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from adapters.local_worker import quiet_generation_libraries

quiet_generation_libraries()  # diffusers' loading bars would break up the tables, as in the CLI
