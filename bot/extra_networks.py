"""LoRAs and textual-inversion embeddings: the files a server owner drops into two folders.

    networks = ExtraNetworks.from_settings(settings)
    networks.lora("cyan")          # LoraFile(name="cyan", path=.../loras/cyan.safetensors)
    networks.lora("cyna")          # InvalidCommand: unknown LoRA 'cyna' (did you mean cyan?) ...
    networks.loras()               # every installed LoRA, by name

LoRAs live in `storage.lora_dir` (default `<data_dir>/loras/`), embeddings in `storage.embeddings_dir`
(default `<data_dir>/embeddings/`); each is named by its file stem, the way AUTOMATIC1111 names them,
and the folders are read again whenever a name is looked up, so a new file needs no restart.

Everything here reads file names and safetensors headers (a length and a JSON document at the start
of the file), never tensors: `bot/` does not import torch. What a file is for (its model family) is
told from its header: the width of the text its cross-attention reads, 768 for SD 1.x, 1024 for
SD 2.x, 2048 for SDXL. The worker loads the tensors (generation/extra_networks.py).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bot.config import Settings
from bot.domain import GenerationParams
from bot.errors import InvalidCommand

# LoRAs come as safetensors; a pickled LoRA (.pt, .ckpt, .bin) can run code when it is loaded.
LORA_SUFFIXES = (".safetensors",)
# Embeddings: safetensors, or AUTOMATIC1111's and diffusers' .pt/.bin, read by torch's weights-only
# loader, which refuses anything but tensors and plain containers (so cannot run code).
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
PICKLED_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
FAMILIES_BY_TEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

Kind = Literal["lora", "embedding"]
# `/teach` writes each user's trained LoRAs to <lora_dir>/trained/u<users.id>/NAME.safetensors: not listed
# by /loras, and used by jobs under the name `trained/u<id>/NAME`, which only the job service writes
# (for their owner, bot/teach.py); a name a user types may not hold a "/".
TRAINED_FOLDER = "trained"
# What a trained LoRA may be called: a word a user types, and a file name on every system.
TRAINED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


def trained_lora_name(owner_id: int, name: str) -> str:
    return f"{TRAINED_FOLDER}/u{owner_id}/{name}"


# `/teach --kind embedding` writes <embeddings_dir>/trained/u<users.id>/NAME.safetensors: not listed by
# /loras, and loaded by the worker under this word, which the job service writes into its owner's
# prompts in place of the name or trigger word (bot/teach.py), and refuses in anyone's own typing.
TRAINED_EMBEDDING_WORD = re.compile(rf"{TRAINED_FOLDER}-u\d+-[a-z0-9_-]+", re.IGNORECASE)


def trained_embedding_word(owner_id: int, name: str) -> str:
    return f"{TRAINED_FOLDER}-u{owner_id}-{name.lower()}"  # lower case: the CLIP tokenizer's own case


def replace_words(text: str, words: Iterable[str], replacement: str) -> str:
    """`text` with every whole-word use of `words` (any case; `-` counts as part of a word) written
    `replacement`: a trained embedding's name or trigger word becomes the word its vectors load under."""
    said = re.compile(rf"(?<![\w-])(?:{'|'.join(map(re.escape, words))})(?![\w-])", re.IGNORECASE)
    return said.sub(replacement, text)

# AUTOMATIC1111's extra-network tags: `<lora:NAME:WEIGHT>`, `<lora:NAME>`; `lyco` is its older
# name for the same thing. The name may hold spaces (it is a file stem).
_TAG = re.compile(r"<\s*(lora|lyco|hypernet)\s*:([^<>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class NetworkFile:
    """One installed LoRA or embedding."""

    kind: Kind
    name: str  # the file stem: what users type
    path: Path

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def take_lora_tags(prompt: str) -> tuple[str, list[str]]:
    """Take `<lora:NAME:WEIGHT>` tags out of a prompt: the prompt without them (spaces tidied) and each
    tag's "NAME:WEIGHT" text, as `--lora` takes it.

    >>> take_lora_tags("a cyan circle <lora:cyan:0.8> on a blue background")
    ('a cyan circle on a blue background', ['cyan:0.8'])
    """
    specs = []
    for match in _TAG.finditer(prompt):
        if match[1].lower() == "hypernet":
            raise InvalidCommand(f"hypernetworks ({match[0][:40]}) are not supported; LoRAs are: <lora:NAME:WEIGHT>")
        specs.append(match[2].strip())
    if not specs:
        return prompt, []
    return " ".join(_TAG.sub(" ", prompt).split()), specs


def has_lora_tag(text: str) -> bool:
    return _TAG.search(text) is not None


def parse_lora_specs(specs: Iterable[str], networks: ExtraNetworks, max_loras: int,
                     max_weight: float) -> tuple[tuple[str, float], ...]:
    """("NAME:WEIGHT" or "NAME", ...) from `<lora:...>` tags and `--lora` flags, checked: each names an
    installed LoRA (its file stem), once, with a weight from -max_weight to max_weight (default 1).
    The result is sorted by name, as GenerationParams keeps it."""
    chosen: dict[str, float] = {}
    for spec in specs:
        name, weight = _name_and_weight(spec, max_weight)
        if "/" in name or "\\" in name:
            raise InvalidCommand(f"unknown LoRA {name[:40]!r}: a LoRA's name holds no / or \\; /loras lists them")
        found = networks.lora(name)
        if found.name in chosen:
            raise InvalidCommand(f"LoRA {found.name!r} was given twice; give it once, with one weight")
        chosen[found.name] = weight
    if len(chosen) > max_loras:
        raise InvalidCommand(f"a job may use at most {max_loras} LoRAs (got {len(chosen)}; limits.max_loras)")
    return tuple(sorted(chosen.items()))


def _name_and_weight(spec: str, max_weight: float) -> tuple[str, float]:
    parts = [part.strip() for part in spec.split(":")]
    if len(parts) > 2 or not parts[0]:
        raise InvalidCommand(f"write a LoRA as NAME:WEIGHT, e.g. <lora:cyan:0.8> or --lora cyan:0.8 (got "
                             f"{spec[:40]!r}); separate text-encoder and UNet weights are not supported")
    if len(parts) == 1 or not parts[1]:
        return parts[0], 1.0
    try:
        weight = float(parts[1])
    except ValueError:
        weight = math.nan
    if not -max_weight <= weight <= max_weight:  # also false for nan
        raise InvalidCommand(f"LoRA {parts[0][:40]!r}: the weight must be a number from {-max_weight:g} to "
                             f"{max_weight:g} (got {parts[1][:20]!r})")
    return parts[0], weight


def text_width_family(width: int | None) -> str:
    """The models whose UNet reads text `width` wide, in words: "SD 1.x models", "SDXL models"..."""
    if width is None:
        return "an unknown model family"
    family = FAMILIES_BY_TEXT_WIDTH.get(width)
    return f"{family} models" if family else f"models with {width}-wide text"


def a_model_reading(width: int) -> str:
    """One model whose UNet reads text `width` wide: "an SD 1.x model", "a model with 64-wide text"."""
    family = FAMILIES_BY_TEXT_WIDTH.get(width)
    return f"an {family} model" if family else f"a model with {width}-wide text"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor names with dtype and shape, and `__metadata__`.

    Raises ValueError, saying what is wrong, when the file is not safetensors.
    """
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path.name} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path.name} is not a safetensors file (its header would be {length} bytes)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    return header


def lora_text_width(header: dict[str, Any]) -> int | None:
    """The width of the text a LoRA's cross-attention reads (768, 1024, 2048...), or of the text
    encoder it changes when it has no UNet part; None when no such layer is in it.

    Both layouts users download are read: kohya-ss/AUTOMATIC1111 (`lora_unet_..._attn2_to_k.lora_down.weight`,
    SDXL's `lora_te2_...`) and diffusers/PEFT (`unet....attn2.to_k.lora_A.weight`).
    """
    names = [name for name in header if name != "__metadata__"]
    if any(name.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) for name in names):
        return 2048  # two text encoders: SDXL
    down = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
    for name in names:
        if name.endswith(down) and ("attn2_to_k" in name or "attn2.to_k" in name):
            return int(header[name]["shape"][1])
    for name in names:  # text encoder only: its hidden size is the text's width
        if name.endswith(down) and ("q_proj" in name):
            return int(header[name]["shape"][1])
    return None


def addnet_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash (`Lora hashes: "name: hash"`): the first 12 hex digits of the SHA-256
    of a safetensors file after its header, so that editing the metadata keeps the hash."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        file.seek(8 + length)
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def file_hash(path: Path) -> str:
    """The first 12 hex digits of a file's SHA-256, as AUTOMATIC1111 writes `TI hashes`."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class ExtraNetworks:
    """The installed LoRAs and embeddings, found by file stem; the folders are read on every lookup."""

    def __init__(self, lora_dir: Path | None, embeddings_dir: Path | None) -> None:
        """None for a folder: nothing of that kind is installed."""
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
        self._hashes: dict[tuple[Path, int, int], str] = {}  # (path, size, mtime) -> short hash

    @classmethod
    def from_settings(cls, settings: Settings) -> ExtraNetworks:
        return cls(settings.storage.loras, settings.storage.embeddings)

    def loras(self) -> dict[str, NetworkFile]:
        """Every installed LoRA by name, in name order."""
        return self._scan("lora", self.lora_dir, LORA_SUFFIXES)

    def embeddings(self) -> dict[str, NetworkFile]:
        """Every installed embedding by name (the word that calls it), in name order."""
        return self._scan("embedding", self.embeddings_dir, EMBEDDING_SUFFIXES)

    def trained_path(self, kind: str, owner_id: int, name: str) -> Path:
        """Where `/teach` writes a user's trained LoRA or embedding (the folders above)."""
        folder = self.embeddings_dir if kind == "embedding" else self.lora_dir
        if folder is None:
            raise InvalidCommand(f"no folder is configured for trained {kind}s")
        return folder / TRAINED_FOLDER / f"u{owner_id}" / f"{name}.safetensors"

    def trained_embeddings(self) -> dict[str, NetworkFile]:
        """Every user's trained embedding, by the word the job service writes for its owner."""
        folder = self.embeddings_dir / TRAINED_FOLDER if self.embeddings_dir is not None else None
        if folder is None or not folder.is_dir():
            return {}
        found = {}
        for path in sorted(folder.glob("u*/*.safetensors")):
            owner = path.parent.name[1:]
            if owner.isdigit() and TRAINED_NAME.fullmatch(path.stem):
                word = trained_embedding_word(int(owner), path.stem)
                found[word] = NetworkFile("embedding", word, path)
        return found

    def lora(self, name: str) -> NetworkFile:
        """The LoRA called `name` (exactly, else ignoring case), or InvalidCommand naming the closest ones.
        A name some user trained (`/teach`) is found too, as a file of theirs: the job service then
        picks the requester's own, or refuses (bot/teach.py)."""
        if name.startswith(f"{TRAINED_FOLDER}/") and self.lora_dir is not None:
            path = self.lora_dir / f"{name}.safetensors"
            if path.is_file():
                return NetworkFile("lora", name, path)
        installed = self.loras()
        if name in installed:
            return installed[name]
        folded = [known for known in installed if known.lower() == name.lower()]
        if len(folded) == 1:
            return installed[folded[0]]
        pickled = [self.lora_dir / f"{name}{suffix}" for suffix in PICKLED_SUFFIXES] if self.lora_dir else []
        if any(path.is_file() for path in pickled):
            raise InvalidCommand(f"LoRA {name!r} is a pickle file, which can run code when loaded, so Easel does "
                                 f"not load it; ask the server owner to convert it to .safetensors")
        trained = self.trained_files(name)
        if trained and "/" not in name:
            return trained[0]
        close = difflib.get_close_matches(name, list(installed), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        listing = "/loras lists them" if installed else f"none are installed (in {self.lora_dir})"
        raise InvalidCommand(f"unknown LoRA {name[:40]!r}{hint}; {listing}")

    def trained_files(self, name: str) -> list[NetworkFile]:
        """Every user's trained LoRA called `name` (named by stem, like installed ones)."""
        folder = self.lora_dir / TRAINED_FOLDER if self.lora_dir is not None else None
        if folder is None or not folder.is_dir() or not TRAINED_NAME.fullmatch(name):
            return []
        return [NetworkFile("lora", name, path) for path in sorted(folder.glob(f"u*/{name}.safetensors"))]

    def words_in(self, *texts: str) -> list[NetworkFile]:
        """The embeddings whose names appear as words in `texts` (a prompt and its negative)."""
        words = {word.strip(",.;:!?()[]{}").lower() for text in texts for word in text.split()}
        everything = {**self.embeddings(), **self.trained_embeddings()}
        return [found for name, found in everything.items() if name.lower() in words]

    def short_hash(self, found: NetworkFile) -> str:
        """AUTOMATIC1111's short hash of an installed file (cached while the file is unchanged)."""
        stat = found.path.stat()
        key = (found.path, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            safetensors = found.path.suffix.lower() == ".safetensors"
            self._hashes[key] = addnet_hash(found.path) if found.kind == "lora" and safetensors \
                else file_hash(found.path)
        return self._hashes[key]

    def a1111_hashes(self, params: GenerationParams) -> list[tuple[str, str]]:
        """AUTOMATIC1111's `Lora hashes` and `TI hashes` fields for a job's parameters chunk: its LoRAs,
        and the embeddings its prompt or negative names (files since removed are left out)."""
        fields = []
        loras = self.loras()
        lora_hashes = [f"{name}: {self.short_hash(loras[name])}" for name, _ in params.loras if name in loras]
        if lora_hashes:
            fields.append(("Lora hashes", ", ".join(lora_hashes)))
        used = self.words_in(params.prompt, params.negative)
        embeddings = [f"{found.name}: {self.short_hash(found)}" for found in used]
        if embeddings:
            fields.append(("TI hashes", ", ".join(embeddings)))
        return fields

    def lora_family(self, found: NetworkFile) -> str | None:
        """"SD 1.x", "SD 2.x" or "SDXL" when a LoRA's header says which (by its text width), else None."""
        try:
            return FAMILIES_BY_TEXT_WIDTH.get(lora_text_width(read_safetensors_header(found.path)) or 0)
        except (OSError, ValueError):
            return None

    def family(self, found: NetworkFile) -> str:
        """Which models a file is for, in words: "builtin:shapes", "SD 1.x", "SDXL", ..."""
        if found.path.suffix.lower() != ".safetensors":
            return "unknown (not safetensors)"
        try:
            header = read_safetensors_header(found.path)
        except (OSError, ValueError) as error:
            return f"unreadable ({error})"
        metadata = header.get("__metadata__") or {}
        if str(metadata.get("ss_sd_model_name", "")).startswith("builtin:"):
            return metadata["ss_sd_model_name"]
        if found.kind == "lora":
            return text_width_family(lora_text_width(header))
        if "clip_g" in header:
            return text_width_family(2048)
        shapes = [entry["shape"] for name, entry in header.items() if name != "__metadata__"]
        return text_width_family(int(shapes[0][-1])) if shapes and shapes[0] else "unknown"

    def entry(self, found: NetworkFile) -> dict[str, Any]:
        """One file as the HTTP API lists it: name, what it is for, size and short hash."""
        return {"name": found.name, "for": self.family(found), "size_bytes": found.size_bytes,
                "hash": self.short_hash(found)}

    def listing(self) -> str:
        """The /loras answer: each LoRA and embedding with what it is for and how to use it."""
        loras, embeddings = self.loras(), self.embeddings()
        lines = []
        if loras:
            lines.append("LoRAs (add <lora:NAME:WEIGHT> to the prompt, or --lora NAME:WEIGHT):")
            lines += [f"  {name}  for {self.family(found)}, {_kb(found.size_bytes)}" for name, found in loras.items()]
        else:
            lines.append(f"No LoRAs are installed (the server owner puts .safetensors files in {self.lora_dir}).")
        if embeddings:
            lines.append("Embeddings (write the name as a word in the prompt or after --no):")
            lines += [f"  {name}  for {self.family(found)}" for name, found in embeddings.items()]
        else:
            lines.append("No embeddings are installed.")
        return "\n".join(lines)

    def _scan(self, kind: Kind, folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, NetworkFile]:
        if folder is None or not folder.is_dir():
            return {}
        found = {path.stem: NetworkFile(kind, path.stem, path) for path in sorted(folder.iterdir())
                 if path.suffix.lower() in suffixes and path.is_file() and not path.name.startswith(".")}
        return dict(sorted(found.items()))


def _kb(size: int) -> str:
    return f"{size / 1024:.0f} KB" if size < 2**20 else f"{size / 2**20:.0f} MB"
