"""`easel convert-checkpoint`: a pickle checkpoint (.ckpt, .pt) rewritten as .safetensors, without running it.

Easel never loads pickle files as models: unpickling runs whatever code the file's author put in it.
This reads one with torch's restricted unpickler (`weights_only=True`), which rebuilds tensors,
numbers, strings and containers and refuses every other object, so no code from the file runs; the
weights are then written as a .safetensors file beside it, which the checkpoints folder picks up.

Example:
    >>> convert_pickle_checkpoint(Path("data/checkpoints/dreamshaper_8.ckpt"))
    PosixPath('data/checkpoints/dreamshaper_8.safetensors')
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from bot.catalog import PICKLE_SUFFIXES
from bot.errors import InvalidCommand


def convert_pickle_checkpoint(path: Path, out: Path | None = None) -> Path:
    """Write the tensors of the pickle checkpoint at `path` to `out` (default: beside it, .safetensors)."""
    # 1. Check inputs
    path = Path(path).expanduser()
    out = Path(out).expanduser() if out is not None else path.with_suffix(".safetensors")
    if not path.is_file():
        raise InvalidCommand(f"{path} does not exist or is not a file")
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise InvalidCommand(f"{path.name} is not a pickle checkpoint ({', '.join(PICKLE_SUFFIXES)}); "
                             ".safetensors files need no converting")
    if out.suffix.lower() != ".safetensors":
        raise InvalidCommand(f"the converted file must end in .safetensors (got {out.name})")
    if out.exists():
        raise InvalidCommand(f"{out} already exists; move it away or give another --out")

    # 2. Read tensors only: the restricted unpickler refuses any other object, so no code from the file runs
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InvalidCommand(f"{path.name} holds more than plain weights ({_refused_object(error)}), so it was not "
                             "converted and nothing in it ran; get the model's .safetensors version instead") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise InvalidCommand(f"{path.name} is not a readable PyTorch checkpoint: {str(error)[:200]}") from None
    weights = _state_dict(loaded)
    if not weights:
        raise InvalidCommand(f"{path.name} holds no tensors to convert")

    # 3. Write beside it under a hidden name, then rename: the checkpoints folder never sees half a file
    partial = out.with_name(f".{out.name}.partial")
    try:
        save_file(_unshared(weights), str(partial), metadata={"converted_from": path.name})
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _refused_object(error: pickle.UnpicklingError) -> str:
    """The object the restricted unpickler refused, from torch's long message ("Unsupported global: ...")."""
    for line in str(error).splitlines():
        if "nsupported" in line:  # "Unsupported global: GLOBAL x.y", "loading unsupported GLOBAL posix.system"
            return line.strip().removeprefix("WeightsUnpickler error: ").rstrip(".")[:200]
    return "Python objects beyond tensors"


def _state_dict(loaded: object) -> dict[str, torch.Tensor]:
    """The weights: a checkpoint's "state_dict" (as training saves it) or the top level, tensors only."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        return {}
    return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores each tensor's own bytes: copy the ones that share memory with an earlier one."""
    seen: set[int] = set()
    result = {}
    for key, tensor in weights.items():
        storage = tensor.untyped_storage().data_ptr()
        result[key] = tensor.clone().contiguous() if storage in seen else tensor.contiguous()
        seen.add(storage)
    return result
