"""LoRAs and textual-inversion embeddings inside one loaded model's pipeline.

    loaded = ModelNetworks("shapes", pipe, ExtraNetworks(lora_dir, embeddings_dir))
    loaded.sync_embeddings()                     # every compatible embedding, new files included
    loaded.activate((("cyan", 0.8),))            # this batch's LoRAs, loaded on first use and kept

LoRAs load through diffusers (`load_lora_weights`, PEFT underneath), which reads both the
kohya-ss/AUTOMATIC1111 layout and the diffusers/PEFT one; each stays loaded as an adapter, named by
its content hash, and a batch only switches which adapters are active and at what weight. A batch
without LoRAs runs with the adapters switched off, so its pixels are exactly the base model's; at
weight 0 a LoRA adds exact zeros, so those pixels are the base model's too.

Embeddings are loaded into the tokenizer and text encoder the model's pipelines share, all the
compatible ones at once (as AUTOMATIC1111 does), so a prompt draws the same whichever jobs ran
before it. A file of another family (another text width) is left out, with a warning in the log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from bot.errors import GenerationFailed
from bot.extra_networks import (
    ExtraNetworks,
    NetworkFile,
    a_model_reading,
    lora_text_width,
    read_safetensors_header,
    text_width_family,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedEmbedding:
    file_key: tuple[Path, int, int]  # path, size, mtime: reloaded when the file changes
    tokens: tuple[int, ...]  # its token ids in the first tokenizer


class ModelNetworks:
    """The LoRA adapters and embeddings loaded into one model. Only the generator's thread calls it."""

    def __init__(self, model_name: str, pipe: DiffusionPipeline, networks: ExtraNetworks) -> None:
        self.model_name = model_name
        self.pipe = pipe
        self.networks = networks
        self.adapters: OrderedDict[str, int] = OrderedDict()  # adapter name -> bytes, least recent first
        self.lora_names: dict[str, str] = {}  # adapter name -> the LoRA's name (its file stem)
        self.embeddings: dict[str, LoadedEmbedding] = {}
        self._active = False
        self._fused: list[tuple[str, float]] = []  # the (adapter, weight) pairs added into the weights now
        self._originals: dict[str, torch.Tensor] = {}  # the weights of every layer a LoRA changes, as loaded

    @property
    def adapter_bytes(self) -> int:
        """The loaded LoRAs, and the copies of the original weights kept for unfusing them."""
        kept = sum(tensor.numel() * tensor.element_size() for tensor in self._originals.values())
        return sum(self.adapters.values()) + kept

    # -- LoRAs -------------------------------------------------------------------------------------

    def activate(self, loras: tuple[tuple[str, float], ...]) -> list[str]:
        """Make exactly `loras` (name, weight) active for the next call; returns their adapter names.

        Raises GenerationFailed, naming the LoRA, when one is missing, of another model family or
        unreadable.
        """
        weights: dict[str, float] = {}  # two names for one file (a copy) are one adapter: weights add up
        for name, weight in loras:
            adapter = self._adapter_for(self.networks.lora(name))
            weights[adapter] = weights.get(adapter, 0.0) + weight
        if list(weights.items()) == self._fused:
            return list(weights)  # the same set as the last batch: already in the weights
        self._unfuse()
        if not weights:
            if self._active:
                self.pipe.disable_lora()
                self._active = False
            return []
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        self._active = True
        self._fuse(list(weights))
        self._fused = list(weights.items())
        return list(weights)

    def _lora_layers(self) -> list[tuple[str, LoraLayer]]:
        parts = [("unet", self.pipe.unet)] + [(name, getattr(self.pipe, name, None))
                                              for name in ("text_encoder", "text_encoder_2")]
        return [(f"{part}.{name}", module) for part, model in parts if model is not None
                for name, module in model.named_modules() if isinstance(module, LoraLayer)]

    def _fuse(self, adapters: list[str]) -> None:
        """Add the active LoRAs into the weights they change, so a step costs what it costs without
        them (the extra low-rank products of an unfused LoRA cost a quarter more per image on a CPU).
        The original weights are kept, so that `_unfuse` restores them exactly."""
        with torch.no_grad():
            for name, layer in self._lora_layers():
                if name not in self._originals:
                    self._originals[name] = layer.get_base_layer().weight.detach().clone()
        with _quiet_loading():
            self.pipe.fuse_lora(adapter_names=adapters, lora_scale=1.0)

    def _unfuse(self) -> None:
        """Put back the original weights (bit for bit: subtracting the LoRAs again would not be)."""
        if not self._fused:
            return
        with torch.no_grad():
            for name, layer in self._lora_layers():
                if layer.merged_adapters:
                    layer.get_base_layer().weight.copy_(self._originals[name])
                    layer.merged_adapters = []
        self._fused = []

    def unload(self, adapter: str) -> int:
        """Delete one adapter (to stay within the memory budget); the bytes it held."""
        self._unfuse()
        self.pipe.delete_adapters(adapter)
        freed = self.adapters.pop(adapter, 0)
        self.lora_names.pop(adapter, None)
        if not self.adapters:
            self._active = False
        return freed

    def _adapter_for(self, found: NetworkFile) -> str:
        adapter = f"lora_{self.networks.short_hash(found)}"  # a changed file is another adapter
        if adapter in self.adapters:
            self.adapters.move_to_end(adapter)
            return adapter
        # 1. Check its family: the width of the text its layers read must be this model's.
        try:
            header = read_safetensors_header(found.path)
        except (OSError, ValueError) as error:
            raise GenerationFailed(f"LoRA {found.name!r} cannot be read: {error}") from None
        width, ours = lora_text_width(header), self._text_width()
        if width is not None and width != ours:
            raise GenerationFailed(
                f"LoRA {found.name!r} is for {text_width_family(width)}, and model {self.model_name!r} is "
                f"{a_model_reading(ours)}; use a LoRA made for {self.model_name} (/loras says what each is for)")
        # 2. Load it as an adapter; diffusers converts the kohya-ss layout.
        before = _adapters_in(self.pipe)
        try:
            with _quiet_loading():
                self.pipe.load_lora_weights(str(found.path), adapter_name=adapter)
        except (ValueError, KeyError, RuntimeError, OSError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GenerationFailed(f"LoRA {found.name!r} could not be loaded: {reason[:200]}") from None
        if adapter not in _adapters_in(self.pipe) - before:
            raise GenerationFailed(f"LoRA {found.name!r} changes no layer of model {self.model_name!r}; it is "
                                   "probably for another kind of model")
        self.adapters[adapter] = _tensor_bytes(header, self.pipe.unet.dtype)
        self.lora_names[adapter] = found.name
        return adapter

    def _text_width(self) -> int:
        return int(self.pipe.unet.config.cross_attention_dim)

    # -- embeddings --------------------------------------------------------------------------------

    def sync_embeddings(self) -> None:
        """Load every installed embedding of this model's family that is new or changed since last time."""
        for name, found in {**self.networks.embeddings(), **self.networks.trained_embeddings()}.items():
            stat = found.path.stat()
            key = (found.path, stat.st_size, stat.st_mtime_ns)
            loaded = self.embeddings.get(name)
            if loaded is not None and loaded.file_key == key:
                continue
            try:
                self._load_embedding(found, key, loaded)
            except (ValueError, RuntimeError, OSError, KeyError) as error:
                logger.warning("embedding %s not loaded for model %s: %s", found.path, self.model_name, error)
                self.embeddings[name] = LoadedEmbedding(key, loaded.tokens if loaded else ())

    def _load_embedding(self, found: NetworkFile, key: tuple[Path, int, int], loaded: LoadedEmbedding | None) -> None:
        vectors = read_embedding(found.path)
        encoders = self._text_encoders()
        if set(vectors) != set(encoders):
            parts = "the SDXL pair clip_l/clip_g" if len(encoders) == 2 else "one set of vectors"
            raise ValueError(f"this model needs {parts}; the file has {', '.join(sorted(vectors)) or 'none'}")
        for part, (_, encoder) in encoders.items():
            if vectors[part].shape[-1] != encoder.get_input_embeddings().weight.shape[1]:
                raise ValueError(f"it is for {text_width_family(vectors[part].shape[-1])} models (vectors "
                                 f"{vectors[part].shape[-1]} wide), and this model's text encoder takes "
                                 f"{encoder.get_input_embeddings().weight.shape[1]}")
        if loaded is not None and loaded.tokens:  # a changed file: overwrite its vectors in place
            first = vectors[next(iter(encoders))]
            if len(first) != len(loaded.tokens):
                raise ValueError("it changed its number of vectors; restart the worker to load it")
            for part, (tokenizer, encoder) in encoders.items():
                ids = tokenizer.convert_tokens_to_ids(token_names(found.name, len(first)))
                with torch.no_grad():
                    table = encoder.get_input_embeddings().weight
                    table[ids] = vectors[part].to(device=table.device, dtype=table.dtype)
            self.embeddings[found.name] = LoadedEmbedding(key, loaded.tokens)
            return
        for part, (tokenizer, encoder) in encoders.items():
            self.pipe.load_textual_inversion(vectors[part], token=found.name, tokenizer=tokenizer,
                                             text_encoder=encoder)
        tokenizer = next(iter(encoders.values()))[0]
        tokens = tuple(tokenizer.convert_tokens_to_ids(token_names(found.name, len(vectors[next(iter(vectors))]))))
        self.embeddings[found.name] = LoadedEmbedding(key, tokens)

    def _text_encoders(self) -> dict[str, tuple]:
        """The (tokenizer, text encoder) pairs an embedding's parts go to: "" for SD 1.x and 2.x, and
        AUTOMATIC1111's "clip_l" and "clip_g" for SDXL's two."""
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            return {"clip_l": (self.pipe.tokenizer, self.pipe.text_encoder),
                    "clip_g": (self.pipe.tokenizer_2, self.pipe.text_encoder_2)}
        return {"": (self.pipe.tokenizer, self.pipe.text_encoder)}


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """An embedding file's vectors, (vectors, width) each: `{"": tensor}`, or SDXL's `{"clip_l", "clip_g"}`.

    Reads AUTOMATIC1111's formats (`emb_params` in safetensors, `string_to_param` in a .pt) and
    diffusers' (`{token: tensor}`, as learned_embeds.safetensors or .bin). A .pt or .bin is read by
    torch's weights-only loader, which refuses anything but tensors and plain containers.
    """
    if path.suffix.lower() == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle.UnpicklingError and friends: more than tensors inside
            raise ValueError(f"it is not a plain tensor file ({type(error).__name__}); save it as .safetensors") \
                from None
    if isinstance(state, torch.Tensor):
        return {"": _as_vectors(state)}
    if not isinstance(state, dict):
        raise ValueError("it holds no embedding")
    if "string_to_param" in state:
        return {"": _as_vectors(next(iter(state["string_to_param"].values())))}
    if "clip_l" in state and "clip_g" in state:
        return {"clip_l": _as_vectors(state["clip_l"]), "clip_g": _as_vectors(state["clip_g"])}
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]
    if len(tensors) != 1:
        raise ValueError(f"expected one tensor (emb_params, or diffusers' {{token: tensor}}), or "
                         f"string_to_param; found keys {', '.join(map(str, list(state)[:5]))}")
    return {"": _as_vectors(tensors[0])}


def _as_vectors(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().float()
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def token_names(word: str, count: int) -> list[str]:
    """diffusers' tokens for a multi-vector embedding: the word, then word_1, word_2..."""
    return [word] + [f"{word}_{i}" for i in range(1, count)]


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers says when a LoRA has no text-encoder part (most have none) and PEFT when a model gets a
    second adapter: both expected here, neither worth a line in the worker's log."""
    lora_log = logging.getLogger("diffusers.loaders.lora_base")
    level = lora_log.level
    lora_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        lora_log.setLevel(level)


def _adapters_in(pipe: DiffusionPipeline) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def _tensor_bytes(header: dict, dtype: torch.dtype) -> int:
    """What a LoRA's tensors take once loaded in the model's dtype."""
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__") \
        * torch.tensor([], dtype=dtype).element_size()
