"""Train `builtin:shapes`: a small Stable Diffusion that draws coloured shapes on command.

    python -m generation.train_builtin --out generation/models/builtin-shapes

It trains the components a real Stable Diffusion 1.x pipeline has — a diffusers `AutoencoderKL`,
a `UNet2DConditionModel` and a transformers `CLIPTextModel` behind the offline CLIP tokenizer of
`generation/builtin.py`, and a PNDM scheduler config that every sampler is built from — so
txt2img, img2img and inpaint run through exactly the code real models use. The pictures come from
`generation/shapes.py`.

1. VAE: 64x64 pictures to 16x16x4 latents and back, trained on reconstructions.
2. Latents of a fixed set of training pictures are computed once, with their captions' embeddings.
3. UNet: learns to denoise those latents (v-prediction), conditioned on the caption (dropped one
   time in ten, so classifier-free guidance works).

The text encoder keeps its fixed random initialisation (frozen): each caption still gets its own
embedding, which the UNet learns to read, and freezing it lets every caption be encoded once.

Everything is seeded, and torch runs on one thread by default, so the same command on the same
torch release writes the same weights. A progress bar shows each stage; the loss log and the wall
time are written to `training_log.json` next to the weights. The shipped model took 30 minutes on
one thread of a 2-core machine that others were using too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from generation.builtin import MAX_TOKENS, _tiny_tokenizer
from generation.shapes import SIDE, draw, random_scene, training_combinations

SEED = 0
# DDPM's linear noise schedule, every diffusers sampler's default. Not SD 1.x's scaled_linear one:
# that leaves 7% of the picture in the noise at the last step, and a flat background is so strong a
# signal that the model read the background colour out of the starting noise instead of the prompt.
# Here 0.6% is left, below the noise's own average over the 16x16 latents.
# The UNet predicts v (as SD 2 does), not the noise: predicting noise, a model learns almost nothing
# about the picture at the noisiest steps, which are the ones where the prompt must decide it.
SCHEDULE = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
            "prediction_type": "v_prediction"}
DEFAULTS = {"vae_steps": 800, "unet_steps": 3500, "images": 12000, "batch": 32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the diffusers model to")
    parser.add_argument("--vae-steps", type=int, default=DEFAULTS["vae_steps"])
    parser.add_argument("--unet-steps", type=int, default=DEFAULTS["unet_steps"])
    parser.add_argument("--images", type=int, default=DEFAULTS["images"], help="training pictures")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    # One thread: the same weights on every machine (the order of float sums depends on the thread
    # count), and on a busy 2-core machine one thread is several times faster than two fighting.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    train(args.out, vae_steps=args.vae_steps, unet_steps=args.unet_steps, images=args.images,
          batch=args.batch, device_name=args.device)


def train(out: Path, vae_steps: int, unet_steps: int, images: int, batch: int, device_name: str = "cpu") -> None:
    """Train every component and save the pipeline to `out` (replaced only once training is done)."""
    device = torch.device(device_name)
    started = time.monotonic()
    log: dict = {"seed": SEED, "settings": {"vae_steps": vae_steps, "unet_steps": unet_steps,
                                            "images": images, "batch": batch, "threads": torch.get_num_threads(),
                                            "torch": torch.__version__}, "loss": {}, "seconds": {}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".shapes-", dir=Path(out).parent))  # same disk: rename works
    try:
        # 1. Tokenizer and frozen text encoder
        tokenizer = _tiny_tokenizer(staging / "tokenizer")
        text_encoder = build_text_encoder(tokenizer)

        # 2. VAE on reconstructions
        vae = build_vae()
        log["loss"]["vae"] = train_vae(vae, vae_steps, batch, device)
        log["seconds"]["vae"] = round(time.monotonic() - started, 1)

        # 3. The training set as latents, and every caption's embedding
        latents, captions = encode_pictures(vae, images, device)
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        embeddings = embed_captions(tokenizer, text_encoder, [*sorted(set(captions)), ""])
        log["scaling_factor"] = vae.config.scaling_factor
        log["seconds"]["encode"] = round(time.monotonic() - started - sum(log["seconds"].values()), 1)

        # 4. UNet on the cached latents
        unet = build_unet()
        ema = train_unet(unet, latents * vae.config.scaling_factor, captions, embeddings, unet_steps, batch,
                         device, log["loss"])
        log["seconds"]["unet"] = round(time.monotonic() - started - sum(log["seconds"].values()), 1)

        # 5. Save as a plain diffusers folder, in safetensors
        pipe = StableDiffusionPipeline(
            vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=ema.cpu(),
            scheduler=build_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(staging, safe_serialization=True)
        log["seconds"]["total"] = round(time.monotonic() - started, 1)
        (staging / "training_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved to {out} in {log['seconds']['total'] / 60:.1f} min")


def build_scheduler() -> PNDMScheduler:
    """The scheduler config every sampler is built from (generation/samplers.py)."""
    scheduler = PNDMScheduler(**SCHEDULE, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    # As in Stable Diffusion's own config: DDIM would otherwise clip its latent estimates to [-1, 1].
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    return encoder.eval().requires_grad_(False)


def build_vae() -> AutoencoderKL:
    """Three blocks: a vae_scale_factor of 4 (SD has 8), so 64x64 pictures are 16x16 latents."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, sample_size=SIDE,
        )
    # A near-deterministic posterior, like a trained SD VAE: the log-variance half of the moments is
    # pinned very low and never trained (the reconstruction loss reads only the mean).
    half = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(-20.0)
    return vae


def build_unet() -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 2)
        return UNet2DConditionModel(
            sample_size=SIDE // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(32, 64, 64), cross_attention_dim=64, attention_head_dim=4,
            # The caption also reaches every ResNet block through the timestep embedding (attention-
            # pooled), as in Kandinsky: colours are whole-picture facts that a few cross-attention
            # layers alone learn slowly. The pipeline passes nothing extra for it.
            addition_embed_type="text", addition_embed_type_num_heads=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )


def pictures(seed: int, batch: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless batches of training pictures (scaled to -1..1, as diffusers' VAE expects) and captions."""
    rng, combinations = random.Random(seed), training_combinations()
    while True:
        scenes = [random_scene(rng, combinations) for _ in range(batch)]
        arrays = np.stack([np.asarray(draw(scene), dtype=np.float32) for scene in scenes])
        yield torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1, [scene.caption for scene in scenes]


def train_vae(vae: AutoencoderKL, steps: int, batch: int, device: torch.device) -> list[float]:
    vae.to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)  # no weight decay: the pinned half stays put
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=max(steps, 1),
                                                   pct_start=0.05)
    crop = SIDE // 2  # the VAE is convolutional: quarter-size crops teach it at a quarter of the cost
    generator = torch.Generator().manual_seed(SEED + 3)
    losses, log = [], []
    for step, (images, _) in zip(tqdm(range(steps), desc="vae", unit="step"), pictures(SEED + 4, batch),
                                 strict=False):
        y, x = torch.randint(0, SIDE - crop + 1, (2,), generator=generator).tolist()
        images = images[:, :, y : y + crop, x : x + crop].to(device)
        latents = vae.encode(images).latent_dist.mean
        loss = F.mse_loss(vae.decode(latents).sample, images) + 1e-4 * latents.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log.append(round(sum(losses) / len(losses), 5))
            losses.clear()
    return log


@torch.no_grad()
def encode_pictures(vae: AutoencoderKL, count: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    vae.eval()
    chunks, captions = [], []
    size = min(count, 100)
    batches = pictures(SEED + 5, size)
    for _ in tqdm(range(math.ceil(count / size)), desc="encode", unit="batch"):
        images, texts = next(batches)
        chunks.append(vae.encode(images.to(device)).latent_dist.mean.cpu())
        captions += texts
    return torch.cat(chunks)[:count], captions[:count]


@torch.no_grad()
def embed_captions(tokenizer: CLIPTokenizer, encoder: CLIPTextModel, texts: list[str]) -> dict[str, torch.Tensor]:
    """Each caption's last hidden states, padded to 77 tokens exactly as the pipeline pads prompts."""
    tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
    states = encoder(tokens).last_hidden_state
    return dict(zip(texts, states, strict=True))


def train_unet(unet: UNet2DConditionModel, latents: torch.Tensor, captions: list[str],
               embeddings: dict[str, torch.Tensor], steps: int, batch: int, device: torch.device,
               log: dict) -> UNet2DConditionModel:
    """v-prediction; returns the exponential moving average of the weights."""
    noise_schedule = DDPMScheduler(**SCHEDULE)
    steps_in_schedule = noise_schedule.config.num_train_timesteps

    caption_ids = torch.tensor([sorted(embeddings).index(text) for text in captions])
    table = torch.stack([embeddings[text] for text in sorted(embeddings)]).to(device)
    empty = sorted(embeddings).index("")
    latents, caption_ids = latents.to(device), caption_ids.to(device)

    unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=max(steps, 1),
                                                   pct_start=0.05)
    generator = torch.Generator().manual_seed(SEED + 6)
    losses: list[float] = []
    log["unet"] = []
    for step in tqdm(range(steps), desc="unet", unit="step"):
        picked = torch.randint(0, len(latents), (batch,), generator=generator).to(device)
        clean, ids = latents[picked], caption_ids[picked].clone()
        ids[torch.rand(batch, generator=generator).to(device) < 0.1] = empty  # for classifier-free guidance
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, steps_in_schedule, (batch,), generator=generator).to(device)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        predicted = unet(noisy, timesteps, table[ids]).sample
        loss = F.mse_loss(predicted, noise_schedule.get_velocity(clean, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        _update_ema(ema, unet, step)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log["unet"].append(round(sum(losses) / len(losses), 5))
            losses.clear()
    return ema


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(0.999, (1 + step) / (10 + step))  # short warm-up, so early steps do not linger
    for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
        averaged.lerp_(current, 1 - decay)


if __name__ == "__main__":
    main()
