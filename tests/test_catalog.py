"""The models a server owner drops into <data_dir>/checkpoints/, as users then see and pick them.

These checkpoints carry the real weight names of each family's single-file layout with placeholder
values: the catalog reads names and shapes from the header only (without torch), which is all these
tests need. tests/test_model_families.py loads and runs real (tiny, random) models of each family.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from bot.catalog import ModelCatalog, ModelFamily
from bot.config import LimitsConfig, ModelConfig, load_settings
from bot.domain import GenerateCommand, ModelsCommand
from bot.errors import ConfigError, InvalidCommand
from bot.grammar import CommandParser

UNET = "model.diffusion_model."
# The weights each family's single-file checkpoints are told apart by (as AUTOMATIC1111 saves them).
FAMILY_KEYS = {
    "sd1": ["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"],
    "sd2": ["cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding"],
    "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
             "conditioner.embedders.1.model.positional_embedding"],
}


def checkpoint(path: Path, keys: list[str], shapes: dict[str, tuple[int, ...]] | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors file with these weight names (each a placeholder of its given shape, else one value)."""
    shapes = {UNET + "input_blocks.0.0.weight": (8, 4, 3, 3), UNET + "time_embed.0.weight": (1,),
              "first_stage_model.decoder.conv_in.weight": (1,), **(shapes or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: np.zeros(shapes.get(key, (1,)), np.float16) for key in [*shapes, *keys]}, str(path),
              metadata=metadata)
    return path


def family_checkpoint(path: Path, family: str, **extra) -> Path:
    return checkpoint(path, FAMILY_KEYS[family], **extra)


def diffusers_folder(folder: Path, pipeline: str, unet: dict, vae_blocks: int = 4) -> Path:
    """A diffusers folder's configuration files (what the catalog reads; no weights)."""
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "text_encoder": ["transformers",
                                                                                               "CLIPTextModel"]}))
    (folder / "unet" / "config.json").write_text(json.dumps({"in_channels": 4, **unet}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128] * vae_blocks}))
    return folder


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    return tmp_path / "data" / "checkpoints"


def catalog_of(checkpoints: Path, models: dict[str, ModelConfig] | None = None,
               limits: LimitsConfig | None = None) -> ModelCatalog:
    models = models or {"tiny": ModelConfig(source="builtin:tiny", default_width=64, default_height=64)}
    return ModelCatalog(models, checkpoints_dir=checkpoints, limits=limits, default_model=next(iter(models)))


def parser_of(catalog: ModelCatalog) -> CommandParser:
    return CommandParser(catalog.limits, catalog.configured, catalog.default_name, "euler", catalog=catalog)


# -- finding checkpoints -------------------------------------------------------------------------------


def test_a_checkpoint_dropped_in_is_a_model_named_by_its_stem_without_a_restart(checkpoints: Path) -> None:
    catalog = catalog_of(checkpoints)
    parser = parser_of(catalog)
    assert [model.name for model in catalog.list()] == ["tiny"]

    family_checkpoint(checkpoints / "DreamShaper 8.safetensors", "sd1")
    dream = {model.name: model for model in catalog.list()}["DreamShaper_8"]  # listing reads the folder again
    assert (dream.family, dream.width, dream.height, dream.origin) == (ModelFamily.SD1, 512, 512, "checkpoints")
    assert dream.file == "DreamShaper 8.safetensors"

    family_checkpoint(checkpoints / "xl" / "juggernaut.safetensors", "sdxl")  # a new name is looked for too
    command = parser.parse("/imagine a lighthouse --model Juggernaut")
    assert isinstance(command, GenerateCommand)
    assert (command.params.model, command.params.width, command.params.height) == ("juggernaut", 1024, 1024)


@pytest.mark.parametrize(("family", "label", "side"), [("sd1", "SD 1.x", 512), ("sd2", "SD 2.x", 768),
                                                       ("sdxl", "SDXL", 1024)])
def test_each_familys_single_files_are_told_apart_by_their_weight_names(checkpoints: Path, family: str,
                                                                          label: str, side: int) -> None:
    family_checkpoint(checkpoints / "model.safetensors", family)
    model = catalog_of(checkpoints).get("model")
    assert model is not None and model.usable
    assert (model.family.label, model.width, model.height) == (label, side, side)


def test_a_checkpoint_without_text_encoder_is_known_by_what_its_unet_attends_to(checkpoints: Path) -> None:
    attention = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    checkpoint(checkpoints / "unet_only.safetensors", [], shapes={attention: (320, 1024)})
    assert catalog_of(checkpoints).family_of("unet_only") is ModelFamily.SD2


def test_the_size_a_checkpoint_says_it_was_trained_at_is_its_default(checkpoints: Path) -> None:
    family_checkpoint(checkpoints / "portrait.safetensors", "sdxl", metadata={"modelspec.resolution": "768x1024"})
    model = catalog_of(checkpoints).get("portrait")
    assert (model.width, model.height) == (768, 1024)


def test_a_default_size_beyond_the_limits_is_fitted_into_them(checkpoints: Path) -> None:
    family_checkpoint(checkpoints / "big.safetensors", "sdxl")
    model = catalog_of(checkpoints, limits=LimitsConfig(max_pixels=512 * 512)).get("big")
    assert (model.width, model.height) == (512, 512)


@pytest.mark.parametrize(("pipeline", "unet", "family", "side"), [
    ("StableDiffusionPipeline", {"sample_size": 64, "cross_attention_dim": 768}, "sd1", 512),
    ("StableDiffusionPipeline", {"sample_size": 96, "cross_attention_dim": 1024, "use_linear_projection": True},
     "sd2", 768),
    ("StableDiffusionXLPipeline", {"sample_size": 128, "addition_embed_type": "text_time"}, "sdxl", 1024),
])
def test_diffusers_folders_are_read_from_their_configuration(checkpoints: Path, pipeline: str, unet: dict,
                                                             family: str, side: int) -> None:
    diffusers_folder(checkpoints / "folder model", pipeline, unet)
    model = catalog_of(checkpoints).get("folder_model")
    assert (model.family, model.width, model.height, model.file) == (ModelFamily(family), side, side, "folder model/")


# -- what cannot be used, and why ------------------------------------------------------------------------


def test_a_pickle_checkpoint_is_refused_saying_why_and_how_to_convert_it(checkpoints: Path) -> None:
    checkpoints.mkdir(parents=True)
    (checkpoints / "old.ckpt").write_bytes(b"\x80\x04pickle")
    catalog = catalog_of(checkpoints)
    listing = catalog.describe()
    assert "old.ckpt: old.ckpt is a pickle checkpoint (.ckpt), and loading one can run any code" in listing
    error = _error(parser_of(catalog), "/imagine a cat --model old")
    assert "can run any code hidden in it" in error and f"easel convert-checkpoint {checkpoints / 'old.ckpt'}" in error

    family_checkpoint(checkpoints / "old.safetensors", "sd1")  # the converted copy replaces it
    assert catalog.get("old").usable and "pickle" not in catalog.describe()


def test_a_configured_pickle_source_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, storage={"data_dir": tmp_path}, models={"old": {"source": "/m/old.pt"}})
    assert "models.old: old.pt is a pickle checkpoint (.pt)" in caught.value.message
    assert "easel convert-checkpoint /m/old.pt" in caught.value.message


@pytest.mark.parametrize(("keys", "shapes", "says"), [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], {}, "this is a LoRA, not a model"),
    (["emb_params"], {}, "textual-inversion embedding, not a model"),
    (FAMILY_KEYS["sd1"], {UNET + "input_blocks.0.0.weight": (8, 9, 3, 3)}, "inpainting-only checkpoint"),
    (["conditioner.embedders.0.model.positional_embedding"], {}, "SDXL refiner"),
])
def test_files_that_are_not_models_say_what_they_are(checkpoints: Path, keys: list[str], shapes: dict,
                                                     says: str) -> None:
    path = checkpoint(checkpoints / "thing.safetensors", keys, shapes)
    if keys[0].startswith(("lora", "emb")):  # no UNet at all in these
        from safetensors.numpy import load_file
        save_file({key: value for key, value in load_file(str(path)).items() if key in keys}, str(path))
    model = catalog_of(checkpoints).get("thing")
    assert not model.usable and says in model.problem
    assert says in _error(parser_of(catalog_of(checkpoints)), "/imagine a cat --model thing")


def test_a_file_that_is_not_safetensors_is_named_not_loaded(checkpoints: Path) -> None:
    checkpoints.mkdir(parents=True)
    (checkpoints / "broken.safetensors").write_bytes(b"not a header")
    assert "broken.safetensors is not a readable .safetensors file" in catalog_of(checkpoints).get("broken").problem


def test_an_unknown_model_names_the_choices_and_the_closest(checkpoints: Path) -> None:
    family_checkpoint(checkpoints / "dreamshaper.safetensors", "sd1")
    error = _error(parser_of(catalog_of(checkpoints)), "/imagine a cat --model dreamshapr")
    assert error == ("--model must be one of tiny, dreamshaper; got dreamshapr (did you mean dreamshaper?) "
                     "(/models lists them)")


# -- per-model defaults ----------------------------------------------------------------------------------


def test_a_models_table_gives_its_checkpoint_defaults_that_flags_override(checkpoints: Path) -> None:
    family_checkpoint(checkpoints / "dream.safetensors", "sd1")
    models = {"tiny": ModelConfig(source="builtin:tiny"),
              "dream": ModelConfig(default_steps=30, default_cfg=5.5, default_sampler="DPMPP_2M",
                                   default_negative="blurry, lowres", default_width=512, default_height=768,
                                   description="soft painted portraits")}
    parser = parser_of(catalog_of(checkpoints, models))
    plain = parser.parse("/imagine a portrait --model dream").params
    assert (plain.steps, plain.cfg, plain.sampler, plain.negative, plain.width, plain.height) == \
        (30, 5.5, "dpmpp_2m", "blurry, lowres", 512, 768)
    mine = parser.parse("/imagine a portrait (-hats) --model dream --steps 12 --cfg 8 --sampler euler "
                        "--size 512x512").params
    assert (mine.steps, mine.cfg, mine.sampler, mine.negative, mine.width, mine.height) == \
        (12, 8.0, "euler", "hats", 512, 512)
    listing = parser.catalog.describe()
    assert "dream  SD 1.x; defaults 512x768, 30 steps, cfg 5.5, dpmpp_2m, negative \"blurry, lowres\"" in listing
    assert "soft painted portraits" in listing


def test_a_models_table_whose_checkpoint_is_missing_says_where_to_put_it(checkpoints: Path) -> None:
    catalog = catalog_of(checkpoints, {"tiny": ModelConfig(source="builtin:tiny"), "dream": ModelConfig()})
    assert "models.dream has no source and the checkpoints folder has no dream" in \
        _error(parser_of(catalog), "/imagine a cat --model dream")


@pytest.mark.parametrize(("table", "says"), [
    ({"default_steps": 99}, "models.m: default_steps = 99 must lie between limits.min_steps = 1 and "
                            "limits.max_steps = 50"),
    ({"default_cfg": 0.5}, "models.m: default_cfg = 0.5 must lie between limits.min_cfg = 1"),
    ({"default_sampler": "eulr"}, "models.m: default_sampler = 'eulr' is not one of euler"),
])
def test_defaults_outside_the_limits_are_refused_at_start(tmp_path: Path, table: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace(".", r"\.").replace("(", r"\(")):
        settings = load_settings(None, storage={"data_dir": tmp_path}, generation={"default_model": "m"},
                                 models={"m": {"source": "builtin:tiny", **table}})
        CommandParser.from_settings(settings)


def test_the_built_in_shapes_model_defaults_to_the_guidance_it_draws_best_at(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("EASEL_GENERATION__DEFAULT_MODEL", "EASEL_MODELS"):  # conftest's tiny-only test setup
        monkeypatch.delenv(var)
    parser = CommandParser.from_settings(load_settings(None, storage={"data_dir": tmp_path}))
    assert parser.parse("/imagine a red circle on a blue background").params.cfg == 3.0
    assert parser.parse("/imagine a red circle on a blue background --cfg 7").params.cfg == 7.0
    assert "--cfg X  1 to 20 (default 3)" in parser.help_text()
    assert "shapes (default)  SD 1.x; defaults 64x64, 20 steps, cfg 3, euler" in parser.catalog.describe()


def test_models_is_a_command_and_help_points_to_it(checkpoints: Path) -> None:
    parser = parser_of(catalog_of(checkpoints))
    assert parser.parse("/models") == ModelsCommand()
    assert _error(parser, "/models tiny") == "/models takes nothing after it; pick a model with --model NAME"
    assert "/models  the models, each with its family, size, default settings and what it is for" in parser.help_text()


def _error(parser: CommandParser, text: str) -> str:
    with pytest.raises(InvalidCommand) as caught:
        parser.parse(text)
    assert "\n" not in caught.value.message
    return caught.value.message
