"""Everything that touches torch and diffusers: the worker, pipelines, samplers, built-in models."""

import os

# transformers warns at import time about optional image-processing backends (torchvision) that
# Stable Diffusion never uses; those lines only confuse Easel's users. Real errors still show.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
