"""Train the demonstration LoRAs and textual-inversion embedding that ship for `builtin:shapes`.

    python -m generation.train_extras --out generation/models/shapes-extras     # about 10 min, one CPU thread

`builtin:shapes` draws three shapes (generation/shapes.py). This script teaches it what it cannot
draw, the way people extend real Stable Diffusion models, and writes the results in the formats
they download from model sites:

- `loras/ring.safetensors` and `loras/cross.safetensors`: a LoRA each (rank 4 on the attention
  projections of the UNet's transformer blocks, diffusers' usual LoRA layers) that teaches one new
  shape, in every colour on every background. Saved in the kohya-ss format AUTOMATIC1111 reads:
  `lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and `.alpha`, in float16, with
  kohya's `ss_*` metadata. (A new colour cannot be taught this way: the model's VAE was trained on
  eight colours and decodes any other as the nearest of them, and LoRAs change the UNet.)
- `embeddings/crimson.safetensors`: a textual-inversion embedding (two vectors) for the word
  "crimson", learned from red pictures with the model and text encoder frozen, so that "crimson"
  draws red. Saved as AUTOMATIC1111's `emb_params` tensor.

Each LoRA trains on pictures of its shape (70%) and on the model's own training pictures (30%, so
that prompts without the new shape keep drawing what they did). Everything is seeded and runs on
one torch thread by default: the same command on the same torch release writes the same files.
The loss log and wall time go to `training_log.json` beside them.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save, save_file
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from generation.builtin import SHIPPED_MODELS
from generation.extra_networks import token_names
from generation.shapes import (
    COLOURS,
    NEW_SHAPES,
    Description,
    all_combinations,
    draw,
    random_scene,
    training_combinations,
)
from generation.train_builtin import SCHEDULE, embed_captions

SEED = 0
RANK = 4
LORA_LR = 1e-2
# The attention projections of the transformer blocks: cross-attention (attn2) reads the prompt, so a
# new word can mean something there, and self-attention (attn1) lays out where things go. These are
# the layers diffusers' LoRA training scripts target, and kohya-ss names them the same way.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
EMBEDDING_WORD, EMBEDDING_MEANS = "crimson", "red"
EMBEDDING_VECTORS = 2
EMBEDDING_LR = 5e-3
DEFAULT_OUT = Path(__file__).parent / "models" / "shapes-extras"
DEFAULTS = {"lora_steps": 1000, "embedding_steps": 400, "images": 1500, "batch": 32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for loras/ and embeddings/")
    parser.add_argument("--lora-steps", type=int, default=DEFAULTS["lora_steps"])
    parser.add_argument("--embedding-steps", type=int, default=DEFAULTS["embedding_steps"])
    parser.add_argument("--images", type=int, default=DEFAULTS["images"], help="training pictures per file")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    log: dict = {"seed": SEED, "settings": {**{key: getattr(args, key) for key in DEFAULTS},
                                            "threads": args.threads, "torch": torch.__version__},
                 "loss": {}, "seconds": {}}
    (args.out / "loras").mkdir(parents=True, exist_ok=True)
    (args.out / "embeddings").mkdir(parents=True, exist_ok=True)

    for index, shape in enumerate(NEW_SHAPES):
        lap = time.monotonic()
        state, log["loss"][shape] = train_lora(shape, args.lora_steps, args.images, args.batch, SEED + 10 * index)
        save_kohya_lora(state, args.out / "loras" / f"{shape}.safetensors", name=shape,
                        description=f"teaches builtin:shapes to draw a {shape}")
        log["seconds"][shape] = round(time.monotonic() - lap, 1)

    lap = time.monotonic()
    vectors, log["loss"][EMBEDDING_WORD] = train_embedding(EMBEDDING_WORD, EMBEDDING_MEANS, args.embedding_steps,
                                                           args.images, args.batch, SEED + 100)
    save_file({"emb_params": vectors.contiguous()}, args.out / "embeddings" / f"{EMBEDDING_WORD}.safetensors")
    log["seconds"][EMBEDDING_WORD] = round(time.monotonic() - lap, 1)
    log["seconds"]["total"] = round(time.monotonic() - started, 1)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    print(f"saved to {args.out} in {log['seconds']['total'] / 60:.1f} min")


# -- the base model and its training pictures ---------------------------------------------------------


def load_shapes() -> tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    folder = SHIPPED_MODELS["shapes"]
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").requires_grad_(False)
    return tokenizer, text_encoder, vae, unet


def shape_combinations(shape: str) -> list[Description]:
    """`shape` in every colour on every other colour."""
    return [Description(colour, shape, background) for colour in COLOURS for background in COLOURS
            if colour != background]


@torch.no_grad()
def encode(vae: AutoencoderKL, combinations: list[Description], count: int,
           seed: int) -> tuple[torch.Tensor, list[str]]:
    """`count` random pictures of `combinations` as scaled latents, with their captions."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, combinations) for _ in range(count)]
    chunks = []
    for start in range(0, count, 100):
        pixels = torch.stack([torch.from_numpy(np.asarray(draw(scene), dtype=np.float32))
                              for scene in scenes[start : start + 100]]).permute(0, 3, 1, 2) / 127.5 - 1
        chunks.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(chunks), [scene.caption for scene in scenes]


# -- one training loop for both: v-prediction on cached latents ---------------------------------------


def denoising_loop(unet: UNet2DConditionModel, latents: torch.Tensor, states_of: Callable[[torch.Tensor], torch.Tensor],
                   parameters: list[torch.Tensor], steps: int, batch: int, seed: int, lr: float,
                   desc: str) -> list[float]:
    """Train `parameters` on the denoising loss of `latents`; `states_of(indices)` gives the text states
    of those pictures (recomputed each step where the text encoder's input is what is trained)."""
    noise_schedule = DDPMScheduler(**SCHEDULE)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses, log = [], []
    for step in tqdm(range(steps), desc=desc, unit="step"):
        picked = torch.randint(0, len(latents), (batch,), generator=generator)
        clean = latents[picked]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        predicted = unet(noisy, timesteps, states_of(picked)).sample
        loss = F.mse_loss(predicted, noise_schedule.get_velocity(clean, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log.append(round(sum(losses) / len(losses), 5))
            losses.clear()
    return log


# -- LoRA ----------------------------------------------------------------------------------------------


def train_lora(shape: str, steps: int, images: int, batch: int,
               seed: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A rank-4 LoRA on the attention projections that teaches `shape`; its diffusers/PEFT state dict
    (keys like `down_blocks.1....attn2.to_k.lora_A.weight`) and loss log."""
    tokenizer, text_encoder, vae, unet = load_shapes()
    new = round(images * 0.7)
    latents_new, captions_new = encode(vae, shape_combinations(shape), new, seed)
    latents_old, captions_old = encode(vae, training_combinations(), images - new, seed + 1)
    latents, captions = torch.cat([latents_new, latents_old]), captions_new + captions_old
    table = embed_captions(tokenizer, text_encoder, sorted({*captions, ""}))
    states = torch.stack([table[text] for text in captions])
    empty = table[""]
    generator = torch.Generator().manual_seed(seed + 2)

    def states_of(picked: torch.Tensor) -> torch.Tensor:
        chosen = states[picked].clone()
        chosen[torch.rand(len(picked), generator=generator) < 0.1] = empty  # classifier-free guidance
        return chosen

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    unet.train()
    parameters = [p for p in unet.parameters() if p.requires_grad]
    log = denoising_loop(unet, latents, states_of, parameters, steps, batch, seed + 4, lr=LORA_LR, desc=f"lora {shape}")
    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(unet).items()}, log


def save_kohya_lora(state: dict[str, torch.Tensor], path: Path, name: str, description: str, rank: int = RANK,
                    model: str = "builtin:shapes") -> None:
    """Write a diffusers/PEFT LoRA state dict (rank `rank`, alpha = rank) in the kohya-ss format
    AUTOMATIC1111 and ComfyUI load; `model` is the model it was trained for (`ss_sd_model_name`)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, part = key.rpartition(".lora_")  # "down_blocks.1.attentions.0...attn2.to_k", "A.weight"
        kohya = "lora_unet_" + module.replace(".", "_")
        tensors[f"{kohya}.lora_down.weight" if part.startswith("A") else f"{kohya}.lora_up.weight"] = \
            value.to(torch.float16).contiguous()
        tensors[f"{kohya}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_sd_model_name": model, "ss_output_name": name, "ss_training_comment": description,
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": name,
    }
    save_canonical(tensors, path, metadata)


def save_canonical(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' own writer, with the header's keys in sorted order: the library writes the metadata
    from a hash map whose order changes from process to process, so equal tensors would otherwise
    make files that differ in their header's bytes."""
    data = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as the library pads it
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :])


# -- textual inversion -------------------------------------------------------------------------------------


def train_embedding(word: str, means: str, steps: int, images: int, batch: int,
                    seed: int) -> tuple[torch.Tensor, list[float]]:
    """EMBEDDING_VECTORS input vectors for `word`, learned from pictures of the colour `means` with
    `word` in its place in the captions; everything else frozen."""
    tokenizer, text_encoder, vae, unet = load_shapes()
    combinations = [c for c in all_combinations() if means in (c.colour, c.background)]
    latents, captions = encode(vae, combinations, images, seed)
    ids, spelled = add_embedding_word(tokenizer, text_encoder, word)
    table = text_encoder.get_input_embeddings().weight
    texts = [caption.replace(f" {means} ", f" {spelled} ").replace(f"an {spelled}", f"a {spelled}")
             for caption in captions]
    token_ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids

    def states_of(picked: torch.Tensor) -> torch.Tensor:
        return text_encoder(token_ids[picked]).last_hidden_state

    unet.eval()
    log = denoising_loop(unet, latents, states_of, [table], steps, batch, seed + 1, lr=EMBEDDING_LR,
                         desc=f"embedding {word}")
    return table[ids].detach().clone(), log


def add_embedding_word(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, word: str,
                       vectors: int = EMBEDDING_VECTORS) -> tuple[list[int], str]:
    """Add `word` as `vectors` new tokens, starting from the average word (no meaning in particular),
    and make the text encoder's input table trainable in those rows only (the gradient of every other
    row is masked to zero, so with no weight decay they stay exactly as they were). Returns the new
    tokens' ids and the word as captions must spell it for all its vectors to be read."""
    tokens = token_names(word, vectors)
    tokenizer.add_tokens(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[: ids[0]].mean(dim=0)
    table.requires_grad_(True)
    trained_rows = torch.zeros(len(table), 1, device=table.device)
    trained_rows[ids] = 1
    table.register_hook(lambda grad: grad * trained_rows)  # only the new word's vectors move
    return ids, " ".join(tokens)


if __name__ == "__main__":
    main()
