"""Write a diffusers folder as one single-file checkpoint in the original (CompVis / AUTOMATIC1111) layout.

Users download models as such files; the tests make them from the tiny random-weight models, so the
real single-file path (bot/catalog.py reading the header, diffusers' `from_single_file` renaming the
weights back) is tested offline. The renaming is the inverse of diffusers' own conversion; the fixed
names come from diffusers' table of them (`DIFFUSERS_TO_LDM_MAPPING`).

Example:
    save_single_file(ensure_builtin("tiny-sdxl", cache), checkpoints / "mini.safetensors")
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import load_file, save_file

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Where each family's text encoders live in an original checkpoint: (prefix, OpenCLIP layout?).
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", False)},
    "sd2": {"text_encoder": ("cond_stage_model.model.", True)},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", False),
             "text_encoder_2": ("conditioner.embedders.1.model.", True)},
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def save_single_file(folder: Path, out: Path, family: str, metadata: dict[str, str] | None = None) -> Path:
    """Every part of the diffusers model in `folder` as one .safetensors file at `out`."""
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    checkpoint = {UNET + _unet_key(key, unet_config, unet): value
                  for unet in [_weights(folder / "unet")] for key, value in unet.items()}
    vae = _weights(folder / "vae")
    blocks = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    for key, value in vae.items():
        ldm_key = _vae_key(key, blocks)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention is 1x1 convolutions
        checkpoint[VAE + ldm_key] = value
    for part, (prefix, open_clip) in TEXT_ENCODERS[family].items():
        text = _weights(folder / part)
        checkpoint.update(_open_clip(text, prefix) if open_clip else _clip(text, prefix))
    save_file({key: value.contiguous() for key, value in checkpoint.items()}, str(out), metadata=metadata)
    return out


def _weights(part: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(part.glob("*.safetensors"))))


def _unet_key(key: str, config: dict, unet: dict[str, torch.Tensor]) -> str:
    per_block = config["layers_per_block"] + 1  # resnets, then the down- or upsampler
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"] | DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    if key in fixed:
        return fixed[key]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, part, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        return f"input_blocks.{1 + block * per_block + layer}.{_layer(part, rest)}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per_block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{0 if match[1] == '0' else 2}.{_layer('resnets', match[2]).removeprefix('0.')}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, part, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        return f"output_blocks.{block * per_block + layer}.{_layer(part, rest)}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        attends = any(name.startswith(f"up_blocks.{block}.attentions.") for name in unet)
        return f"output_blocks.{block * per_block + per_block - 1}.{2 if attends else 1}.conv.{match[2]}"
    raise ValueError(f"no original name for UNet weight {key}")


def _layer(part: str, rest: str) -> str:
    if part == "attentions":
        return f"1.{rest}"
    name, _, tail = rest.partition(".")
    return f"0.{_RESNET[name]}.{tail}"


def _vae_key(key: str, blocks: int) -> str:
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_vae_resnet(match[3])}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        name, _, tail = match[2].rpartition(".")
        return f"{match[1]}.mid.attn_1.{_VAE_ATTENTION[name]}.{tail}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{_vae_resnet(match[3])}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):  # the original counts up
        return f"decoder.up.{blocks - 1 - int(match[1])}.block.{match[2]}.{_vae_resnet(match[3])}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
    raise ValueError(f"no original name for VAE weight {key}")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _clip(text: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L as the original keeps it: transformers' own names under `prefix`."""
    return {prefix + ("" if key.startswith("text_model.") else "text_model.") + key: value
            for key, value in text.items() if not key.endswith("position_ids")}


def _open_clip(text: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's names: one in_proj for q, k and v, resblocks, ln_*, c_fc/c_proj, a transposed projection."""
    text = {key.removeprefix("text_model."): value for key, value in text.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in text.items():
        if match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            layer, rest = match[1], match[2]
            if match := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                if match[1] == "q":
                    parts = [text[f"encoder.layers.{layer}.self_attn.{p}_proj.{match[2]}"] for p in "qkv"]
                    out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{match[2]}"] = torch.cat(parts)
                continue
            rest = (rest.replace("self_attn.", "attn.").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[f"{prefix}transformer.resblocks.{layer}.{rest}"] = value
        elif key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif not key.endswith("position_ids"):
            raise ValueError(f"no original name for text encoder weight {key}")
    return out
