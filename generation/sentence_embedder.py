"""The sentence-embedding model behind the prompt check's optional semantic match (bot/safety.py).

It lives here, with everything else that imports torch, so the core (bot/) never does: `bot.bootstrap`
imports this module only when `safety.semantic_model` is set, and hands the loaded embedder to
`PromptCheck.from_settings`.

Example:
    embed = load_sentence_embedder("/models/all-MiniLM-L6-v2")
    vectors = embed(["a prompt", "a category's description"])   # an (n, d) numpy array
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.errors import ConfigError
from bot.safety import Embedder


def load_sentence_embedder(model: str) -> Embedder:
    """A sentence-transformers model from a local folder, on the CPU. Raises ConfigError when the
    package is missing (it is optional: `pip install sentence-transformers`) or the model will not load."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("safety.semantic_model is set but the sentence-transformers package is not "
                          "installed; pip install sentence-transformers, or set semantic_model = \"\"") from None
    try:
        encoder = SentenceTransformer(model, device="cpu", local_files_only=True)
    except Exception as e:
        raise ConfigError(f"safety.semantic_model {model!r} could not be loaded ({type(e).__name__}); give "
                          "a local sentence-transformers folder") from None

    def embed(texts: Sequence[str]) -> Any:
        return encoder.encode(list(texts), convert_to_numpy=True)

    return embed
