"""The built-in offline model `builtin:tiny`: a few-MB Stable Diffusion made from fixed seeds.

It draws noise-like pictures, not art, but it has the exact shape of a real Stable Diffusion 1.x
model (4 latent channels, CLIP tokenizer and text encoder, UNet, VAE, scheduler), so every code path
of Easel — txt2img, img2img, inpaint, every sampler, batching, seeds — runs on a laptop or in CI with
no network and no downloads. It is written to disk as an ordinary diffusers folder and loaded back by
the same code as real models.

Example:
    >>> folder = ensure_builtin("tiny", Path("data/models"))
    >>> pipe = StableDiffusionPipeline.from_pretrained(folder)
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bot.errors import GenerationFailed

# Bump when a recipe changes: the folder name carries it, so an old build is never reused by mistake.
RECIPE_VERSION = 2
SEED = 0

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_TOKENS = 77  # CLIP's context length, as Stable Diffusion 1.x uses it

# Words the tokenizer's merges are learned from, so that common prompt words take a few tokens
# instead of one per letter (prompts would otherwise be cut after about 75 characters).
_MERGE_CORPUS = """
a an the of and in on with at by for from to under over near portrait photo painting drawing sketch
illustration render art style detailed highly intricate beautiful cinematic lighting light dark
night day sunset sunrise sky cloud clouds sun moon star stars forest tree trees mountain mountains
river lake ocean sea beach city street house castle garden flower flowers cat dog bird horse dragon
robot man woman girl boy person face eyes hair smiling red blue green yellow orange purple pink black
white gray golden silver colorful vibrant soft sharp focus realistic photorealistic fantasy
science fiction futuristic ancient old new small large tiny giant snow rain fog water fire smoke
oil watercolor digital concept anime cartoon masterpiece best quality high resolution trending
""".split()  # noqa: SIM905 (a word list reads better as text)
_MAX_MERGES = 300


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """Return the diffusers folder of built-in model `name`, building it under `cache_dir` if needed.

    Trained models (`SHIPPED_MODELS`) come with Easel and are returned where they lie.

    The folder appears atomically (built in a temporary folder, then renamed), so a second process
    never sees half a model; when two processes build at once, the first rename wins and the other
    build is discarded.
    """
    if name in SHIPPED_MODELS:
        return _shipped(name)
    if name not in BUILTIN_MODELS:
        raise GenerationFailed(f"model source 'builtin:{name}' is unknown; the built-in models are: "
                               f"{', '.join('builtin:' + known for known in [*BUILTIN_MODELS, *SHIPPED_MODELS])}")
    folder = Path(cache_dir) / f"builtin-{name}-v{RECIPE_VERSION}"
    if folder.is_dir():
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        BUILTIN_MODELS[name](staging)
        staging.rename(folder)
    except OSError:
        if not folder.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_tiny(folder: Path) -> None:
    """Write the tiny model into `folder`: same seed, same bytes, on any machine."""
    # 1. Tokenizer: byte-level alphabet plus merges learned from a fixed word list
    tokenizer = _tiny_tokenizer(folder / "tokenizer")
    vocab_size = len(tokenizer)

    # 2. Weights from fixed seeds, without disturbing the caller's random state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        torch.manual_seed(SEED + 1)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8,
        )
        torch.manual_seed(SEED + 2)
        # Three blocks: a vae_scale_factor of 4 (real SD has 8), so a 64x64 image is 16x16 latents
        # and 20 steps take a fraction of a second on a CPU.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
        )
    _make_posterior_sharp(vae)

    # 3. Save as a plain diffusers folder, with Stable Diffusion 1.x's own scheduler
    _save_sd_pipeline(folder, vae, text_encoder, tokenizer, unet)


def build_tiny_sd2(folder: Path) -> None:
    """A tiny Stable Diffusion 2.x: what tells 2.x from 1.x, at builtin:tiny's size.

    Its UNet's transformer blocks project linearly and set heads per block, its text encoder uses
    OpenCLIP's GELU, and its scheduler predicts v (as SD 2.1-768 does), so the 2.x code paths of
    diffusers and Easel (family detection, single-file loading, v-prediction samplers) run offline.
    """
    tokenizer = _tiny_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_size=32, hidden_act="gelu"))
        torch.manual_seed(SEED + 1)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), use_linear_projection=True,
        )
        torch.manual_seed(SEED + 2)
        vae = _tiny_vae()
    _make_posterior_sharp(vae)
    _save_sd_pipeline(folder, vae, text_encoder, tokenizer, unet, prediction_type="v_prediction")


def build_tiny_sdxl(folder: Path) -> None:
    """A tiny SDXL: two text encoders of different widths (CLIP ViT-L's and OpenCLIP bigG's roles, the
    second with a projection giving the pooled embedding), a UNet conditioned on both and on the
    picture's size ("text_time"), and SDXL's Euler scheduler; builtin:tiny's VAE."""
    tokenizer = _tiny_tokenizer(folder / "tokenizer")
    tokenizer_2 = _tiny_tokenizer(folder / "tokenizer_2")
    time_embed_dim = 8  # per size number; SDXL conditions on six (original size, crop, target size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_size=32, hidden_act="quick_gelu"))
        torch.manual_seed(SEED + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, hidden_size=64, hidden_act="gelu"))
        torch.manual_seed(SEED + 1)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 64,  # both encoders' hidden states, side by side
            addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=64 + 6 * time_embed_dim,  # pooled text + six size numbers
        )
        torch.manual_seed(SEED + 2)
        vae = _tiny_vae()
    _make_posterior_sharp(vae)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=hidden_size,
        hidden_act=hidden_act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae() -> AutoencoderKL:
    """builtin:tiny's VAE: three blocks, a scale factor of 4, so 64x64 pictures are 16x16 latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
    )


def build_sd15_random(folder: Path) -> None:
    """Stable Diffusion 1.5's full architecture with random weights (float16, about 2 GB).

    For benchmarks on a GPU (`bench/*.py --arch sd15`): every layer real SD 1.5 runs, at its real
    size and cost, with no download. Its pictures are noise.
    """
    tokenizer = _tiny_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=MAX_TOKENS, projection_dim=768,
            hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        unet = UNet2DConditionModel(  # diffusers' defaults are SD 1.x's, but for the text width
            sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        )
    _make_posterior_sharp(vae)
    _save_sd_pipeline(folder, vae, text_encoder, tokenizer, unet, torch.float16)


def _save_sd_pipeline(folder: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel, dtype: torch.dtype = torch.float32,
                      prediction_type: str = "epsilon") -> None:
    """Save the parts as a diffusers folder with SD 1.x's scheduler settings, so every sampler fits."""
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(dtype)
    pipe.save_pretrained(folder, safe_serialization=True)


def _make_posterior_sharp(vae: AutoencoderKL) -> None:
    """Give the encoder a near-zero variance, like a trained VAE.

    A randomly initialised encoder predicts log-variances near 0, so every encode would add unit
    noise to the latents; img2img and inpaint would then mostly see noise instead of the input.
    """
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out  # yields the moments
    half = last.out_channels // 2  # the first half is the mean, the second the log-variance
    with torch.no_grad():
        last.weight[half:].zero_()
        last.bias[half:].fill_(-20.0)  # standard deviation e^-10


def _tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer written from scratch: vocab.json, merges.txt and tokenizer_config.json."""
    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_merges(_MERGE_CORPUS, _MAX_MERGES)
    tokens = alphabet + [char + END_OF_WORD for char in alphabet] + ["".join(pair) for pair in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}

    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "bos_token": START_TOKEN,
        "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN,
    }), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder)


def _learn_merges(words: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Plain byte-pair encoding: merge the most frequent adjacent pair, ties broken alphabetically."""
    corpus = Counter((*word[:-1], word[-1] + END_OF_WORD) for word in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in corpus.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        corpus = Counter({_merge_pair(symbols, best): count for symbols, count in corpus.items()})
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


# bot/catalog.py's BUILTIN_MODELS says what family and size each is (tests/test_model_families.py checks it).
BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {"tiny": build_tiny, "tiny-sd2": build_tiny_sd2,
                                                     "tiny-sdxl": build_tiny_sdxl, "sd15-random": build_sd15_random}

# Trained built-in models ship as diffusers folders inside the package; training them takes far too
# long to do at run time (see generation/train_builtin.py).
SHIPPED_MODELS: dict[str, Path] = {"shapes": Path(__file__).parent / "models" / "builtin-shapes"}


def _shipped(name: str) -> Path:
    folder = SHIPPED_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise GenerationFailed(f"built-in model 'builtin:{name}' is missing from {folder}; reinstall Easel or "
                               f"retrain it with: python -m generation.train_builtin --out {folder}")
    return folder
