"""Train a `/teach` LoRA or embedding a slice of steps at a time, from a checkpoint to a checkpoint
(bot/teach.py).

    trainer = SliceTrainer(catalog, settings, store)
    result = trainer.run_slice(spec, on_step)   # up to teach.slice_steps steps, then its state is saved
    # ...the job goes back to the queue; any worker runs the next slice from the checkpoint...
    trainer.save_result(spec, path)             # after the last slice: the file <lora:NAME> (or the word) loads

The recipe is diffusers' `train_text_to_image_lora.py`, as generation/train_extras.py follows it for the
shipped LoRAs: a `LoraConfig` (rank r, alpha r, gaussian init) on the attention projections of the UNet
added with `unet.add_adapter`, the model's own noise scheduler and prediction type (epsilon or v), MSE
on the noise (or velocity) of the model's VAE latents at random timesteps, AdamW, and
`get_peft_model_state_dict` for the weights, saved in the kohya-ss layout AUTOMATIC1111 reads. Two
changes for slices: the learning rate follows a one-cycle schedule over the whole training (so it is the
same however it is cut), and everything a step draws (pictures, noise, timesteps, which captions are
dropped for classifier-free guidance) comes from one seeded torch.Generator whose state is checkpointed
with the LoRA weights, the optimizer's moments and the schedule. A slice that starts from a checkpoint
therefore computes what an uninterrupted run computes, to the bit on the same device and thread count.

`--kind embedding` is textual inversion (diffusers' `textual_inversion.py`, as generation/train_extras.py
trained the shipped `crimson`): the same loop, but what learns is EMBEDDING_VECTORS new rows of the text
encoder's input table for a private word (`trained-u<owner>-<name>`, written in place of the trigger word
in the captions), everything else frozen, at train_extras' EMBEDDING_LR; the captions are encoded at every
step, since their encoding is what changes. It is saved as AUTOMATIC1111's `emb_params`.

A checkpoint is one of the training job's files in the image store (`jobs/<job id>/checkpoint.pt`, in
the folder or the fleet's bucket), written whole over the last one, so a SIGKILL at any moment leaves
the last finished slice's state, and the next slice, on any worker of the fleet, runs from there.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageOps

from bot.catalog import ModelCatalog, ModelFamily
from bot.config import Settings
from bot.domain import GenerationParams, JobKind
from bot.errors import GenerationFailed, NotFound
from bot.extra_networks import replace_words, trained_embedding_word
from bot.store import ImageStore
from bot.teach import COMPARISON_SEED
from bot.views import TrainingView
from generation.extra_networks import token_names
from generation.pipelines import load_pipeline, resolve_device_dtype
from generation.train_extras import (
    EMBEDDING_LR,
    EMBEDDING_VECTORS,
    LORA_TARGETS,
    add_embedding_word,
    save_canonical,
    save_kohya_lora,
)

CAPTION_DROPOUT = 0.1  # share of steps' captions left empty, so classifier-free guidance still works
CHECKPOINT = "checkpoint.pt"  # the training job's file that holds its state between slices


@dataclass(frozen=True)
class TrainingSpec:
    """One training as a slice needs it: the record, its pictures, and its settings."""

    view: TrainingView
    pictures: list[Image.Image]  # in the record's order, RGB
    model: str
    width: int
    height: int
    batch: int
    learning_rate: float
    seed: int = 0


@dataclass(frozen=True)
class SliceResult:
    step: int  # steps done, all slices together
    loss: float  # the mean loss of this slice's steps
    seconds_per_step: float

    def done(self, spec: TrainingSpec) -> bool:
        return self.step >= spec.view.steps


class SliceTrainer:
    """Runs slices of LoRA and embedding trainings on one device; keeps the last model's parts loaded
    between slices."""

    def __init__(self, catalog: ModelCatalog, settings: Settings, store: ImageStore) -> None:
        self.catalog = catalog
        self.settings = settings
        self.store = store
        self.device, _ = resolve_device_dtype(settings.generation.device, settings.generation.dtype)
        self._parts: tuple[str, int | str, object] | None = None  # (model, rank or job, pipeline with its additions)

    def run_slice(self, spec: TrainingSpec, slice_steps: int,
                  on_step: Callable[[int, int], None] | None = None) -> SliceResult:
        """Run up to `slice_steps` steps from the checkpoint (or from the start), then checkpoint."""
        # 1. The model's parts, with a fresh adapter, and the state so far
        pipe = self._pipeline(spec)
        unet, vae, noise_schedule = pipe.unet, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config)
        embedding = spec.view.kind == "embedding"
        parameters = [p for p in (pipe.text_encoder if embedding else unet).parameters() if p.requires_grad]
        learning_rate = EMBEDDING_LR if embedding else spec.learning_rate  # train_extras' recipe for each kind
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
        total = spec.view.steps
        # A tenth of the steps warm up, at least two: OneCycleLR divides by the warm-up's length minus one,
        # which is zero for --steps 10.
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=total,
                                                       pct_start=max(0.1, 2 / total))
        generator = torch.Generator().manual_seed(spec.seed)
        step = self._restore(spec, pipe, optimizer, schedule, generator)

        # 2. What it learns from: the pictures' latents and the captions' text states (frozen parts; an
        # embedding's captions are encoded at every step, as its vectors are what changes)
        latents = self._latents(vae, spec)
        ids, empty_ids = self._token_ids(pipe, spec)
        if not embedding:
            with torch.no_grad():
                states, empty = pipe.text_encoder(ids).last_hidden_state, pipe.text_encoder(empty_ids).last_hidden_state

        # 3. The steps of this slice
        unet.train(not embedding)
        losses, started = [], time.monotonic()
        end = min(total, step + slice_steps)
        while step < end:
            picked = torch.randint(0, len(latents), (spec.batch,), generator=generator)
            clean = latents[picked]
            noise = torch.randn(clean.shape, generator=generator).to(self.device)
            timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (spec.batch,),
                                      generator=generator).to(self.device)
            dropped = torch.rand(spec.batch, generator=generator) < CAPTION_DROPOUT
            if embedding:
                text = pipe.text_encoder(torch.where(dropped[:, None].to(self.device), empty_ids, ids[picked]))\
                    .last_hidden_state
            else:
                text = torch.where(dropped[:, None, None].to(self.device), empty, states[picked])
            noisy = noise_schedule.add_noise(clean, noise, timesteps)
            target = noise if noise_schedule.config.prediction_type == "epsilon" \
                else noise_schedule.get_velocity(clean, noise, timesteps)
            loss = F.mse_loss(unet(noisy, timesteps, text).sample.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step, total)
        unet.eval()

        # 4. Checkpoint: written whole over the last one
        self._save_checkpoint(spec, step, pipe, optimizer, schedule, generator)
        elapsed = time.monotonic() - started
        return SliceResult(step=step, loss=float(np.mean(losses)) if losses else 0.0,
                           seconds_per_step=elapsed / max(1, len(losses)))

    def save_result(self, spec: TrainingSpec, path: Path) -> None:
        """Write the trained LoRA or embedding (from the checkpoint) where its owner's jobs load it: a
        LoRA in the kohya-ss layout, an embedding as AUTOMATIC1111's `emb_params` (its vectors)."""
        state = self._checkpoint(spec.view.job_id)
        if state is None:
            raise GenerationFailed(f"training {spec.view.job_id} has no checkpoint in the store to save")
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        model = self.catalog.get(spec.model)
        label = model.source if model is not None and model.source.startswith("builtin:") else spec.model
        description = (f"/teach {spec.view.name}: trigger {spec.view.trigger!r}, {len(spec.pictures)} pictures, "
                       f"{spec.view.steps} steps")
        if spec.view.kind == "embedding":
            save_canonical({"emb_params": state["vectors"].contiguous()}, temporary,
                           {"sd_model_name": label, "description": description})
        else:
            save_kohya_lora(state["lora"], temporary, name=spec.view.name, rank=spec.view.rank, model=label,
                            description=description)
        os.replace(temporary, path)

    def has_checkpoint(self, job_id: str) -> bool:
        return CHECKPOINT in self.store.job_file_names(job_id)

    def comparison_params(self, spec: TrainingSpec, lora: str) -> tuple[GenerationParams, GenerationParams]:
        """/imagine of the first caption with the trained word and without: the model's defaults, one
        seed. With a LoRA, that is LoRA `lora` added; with an embedding, the trigger word written as
        the word the worker loads the embedding under (bot/teach.py's own_loras does the same)."""
        model = self.catalog.get(spec.model)
        if model is None:
            raise GenerationFailed(f"model {spec.model!r} is no longer configured")
        caption = spec.view.pictures[0][1]
        without = GenerationParams(kind=JobKind.IMAGINE, prompt=caption, width=spec.width,
                                   height=spec.height, steps=model.steps, cfg=model.cfg, sampler=model.sampler,
                                   model=model.name, seed=COMPARISON_SEED, negative=model.negative)
        if spec.view.kind == "embedding":
            return replace(without, prompt=self._with_word(spec, caption, self._word(spec))), without
        return replace(without, loras=((lora, 1.0),)), without

    def forget(self, job_id: str) -> None:
        """Delete an ended training's checkpoint (nothing happens when it has none)."""
        self.store.delete_job_file(job_id, CHECKPOINT)

    # -- parts ---------------------------------------------------------------------------------------

    def _pipeline(self, spec: TrainingSpec):  # -> StableDiffusionPipeline, with a LoRA adapter or a new word
        """The model's parts in float32 (trained weights and their gradients need it), with a LoRA
        adapter of the training's rank (kept for the next slice of the same model and rank), or with
        the training's new word in its tokenizer and text encoder (kept for that training's next slice)."""
        embedding = spec.view.kind == "embedding"
        key = (spec.model, spec.view.job_id if embedding else spec.view.rank)
        if self._parts is None or self._parts[:2] != key:
            self._parts = None  # the old parts go before the new ones load
            model = self.catalog.get(spec.model)
            if model is None or model.problem is not None:
                raise GenerationFailed(f"model {spec.model!r} cannot be used for training: "
                                       f"{model.problem if model else 'it is no longer configured'}")
            if model.family is ModelFamily.SDXL:
                raise GenerationFailed(f"model {spec.model!r} is an SDXL model; /teach trains for SD 1.x and 2.x "
                                       "models (pick one with --model)")
            pipe = load_pipeline(model.source, self.device, torch.float32, self.settings.storage.model_cache,
                                 family=model.family, config=model.config)
            for part in (pipe.vae, pipe.text_encoder, pipe.unet):
                part.requires_grad_(False).eval()
            if embedding:
                add_embedding_word(pipe.tokenizer, pipe.text_encoder, self._word(spec))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(spec.seed)  # the adapter's initial weights are overwritten below anyway
                    pipe.unet.add_adapter(LoraConfig(r=spec.view.rank, lora_alpha=spec.view.rank,
                                                     init_lora_weights="gaussian", target_modules=LORA_TARGETS))
            self._parts = (*key, pipe)
        return self._parts[2]

    @staticmethod
    def _word(spec: TrainingSpec) -> str:
        """The token an embedding is trained and loaded under (its vectors: it, it_1, ...)."""
        return trained_embedding_word(spec.view.owner_id, spec.view.name)

    @staticmethod
    def _with_word(spec: TrainingSpec, caption: str, spelled: str) -> str:
        """`caption` with the trigger word (bot/teach.py put it in every caption) written `spelled`."""
        return replace_words(caption, (spec.view.trigger,), spelled)

    def _embedding_rows(self, spec: TrainingSpec, pipe) -> list[int]:
        return pipe.tokenizer.convert_tokens_to_ids(
            token_names(self._word(spec), EMBEDDING_VECTORS))

    def _restore(self, spec: TrainingSpec, pipe, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator) -> int:
        """Load the checkpoint into the parts; without one, start from the seed's initial adapter or the
        average word. The step."""
        state = self._checkpoint(spec.view.job_id)
        table = pipe.text_encoder.get_input_embeddings().weight
        rows = self._embedding_rows(spec, pipe) if spec.view.kind == "embedding" else []
        if state is None:
            if rows:
                with torch.no_grad():
                    table[rows] = table[: rows[0]].mean(dim=0)  # as add_embedding_word starts it
                return 0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                initial = {key: (torch.randn_like(value) / spec.view.rank if ".lora_A." in key
                                 else torch.zeros_like(value))  # peft's gaussian init: B = 0, so no change yet
                           for key, value in get_peft_model_state_dict(pipe.unet).items()}
            set_peft_model_state_dict(pipe.unet, initial)
            return 0
        if rows:
            with torch.no_grad():
                table[rows] = state["vectors"].to(table.device)
        else:
            set_peft_model_state_dict(pipe.unet, {key: value.to(self.device) for key, value in state["lora"].items()})
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        return int(state["step"])

    def _save_checkpoint(self, spec: TrainingSpec, step: int, pipe, optimizer: torch.optim.Optimizer,
                         schedule: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator) -> None:
        state = {"step": step, "generator": generator.get_state(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict()}
        if spec.view.kind == "embedding":
            table = pipe.text_encoder.get_input_embeddings().weight
            state["vectors"] = table[self._embedding_rows(spec, pipe)].detach().cpu().clone()
        else:
            state["lora"] = {key: value.detach().cpu().clone()
                             for key, value in get_peft_model_state_dict(pipe.unet).items()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.store.put_job_file(spec.view.job_id, CHECKPOINT, buffer.getvalue())

    def _checkpoint(self, job_id: str) -> dict | None:
        """The state the last slice saved, from the store; None before the first slice."""
        try:
            data = self.store.read_job_file(job_id, CHECKPOINT)
        except NotFound:
            return None
        return torch.load(io.BytesIO(data), weights_only=True)

    @torch.no_grad()
    def _latents(self, vae, spec: TrainingSpec) -> torch.Tensor:
        """Each picture at the model's size (scaled to cover it, centred), as scaled VAE latents (means)."""
        pixels = torch.stack([
            torch.from_numpy(np.asarray(ImageOps.fit(picture, (spec.width, spec.height),
                                                     Image.Resampling.LANCZOS), dtype=np.float32))
            for picture in spec.pictures]).permute(0, 3, 1, 2) / 127.5 - 1
        latents = vae.encode(pixels.to(self.device)).latent_dist.mean
        return latents * vae.config.scaling_factor

    def _token_ids(self, pipe, spec: TrainingSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Each caption's token ids as the pipeline encodes a prompt (an embedding's word spelled with
        all its vectors), and the empty prompt's."""
        captions = [caption for _, caption in spec.view.pictures]
        if spec.view.kind == "embedding":
            spelled = " ".join(token_names(self._word(spec), EMBEDDING_VECTORS))
            captions = [self._with_word(spec, caption, spelled) for caption in captions]
        tokenizer = pipe.tokenizer
        ids = tokenizer([*captions, ""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(self.device)
        return ids[:-1], ids[-1:]
