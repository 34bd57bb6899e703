"""LoRAs and textual-inversion embeddings: the grammar, the files, and what they change in the picture.

The pictures come from `builtin:shapes` with the LoRAs and the embedding that ship beside it
(generation/models/shapes-extras/, made by generation/train_extras.py): the `ring` and `cross`
LoRAs teach it shapes it never saw, and the `crimson` embedding is a new word for red. What a picture
shows is read back by generation/shapes.py's checker.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.console import ConsoleChat
from bot.bootstrap import Core, open_core
from bot.config import ModelConfig, Settings, load_settings
from bot.domain import GenerateCommand, GenerationParams, JobKind, JobStatus
from bot.errors import GenerationFailed, InvalidCommand
from bot.extra_networks import ExtraNetworks, addnet_hash, lora_text_width, read_safetensors_header
from bot.grammar import CommandParser
from bot.store import a1111_parameters, parse_a1111_parameters, read_parameters
from generation.pipelines import DiffusersGenerator, GenerationTask
from generation.shapes import describe
from generation.worker import Worker
from tests.conftest import alice
from tests.http_fixtures import serving

EXTRAS = Path(__file__).resolve().parents[1] / "generation" / "models" / "shapes-extras"
SHAPES = {"shapes": ModelConfig(source="builtin:shapes", default_width=64, default_height=64)}
SEEDS = range(1, 7)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> ExtraNetworks:
    """The shipped LoRAs and embedding, installed as a server owner would: copied into the two folders."""
    root = tmp_path_factory.mktemp("extras")
    shutil.copytree(EXTRAS / "loras", root / "loras")
    shutil.copytree(EXTRAS / "embeddings", root / "embeddings")
    return ExtraNetworks(root / "loras", root / "embeddings")


@pytest.fixture(scope="module")
def shapes(models_dir: Path, installed: ExtraNetworks) -> DiffusersGenerator:
    """Easel's generator on builtin:shapes with the extras installed, loaded once for this file."""
    return DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=models_dir, networks=installed)


def imagine(generator: DiffusersGenerator, prompts: list[str], seed: int = 1,
            loras: tuple[tuple[str, float], ...] = (), negative: str = "") -> list:
    """One picture per prompt, in one call, at Easel's defaults (20 steps, cfg 7, euler)."""
    tasks = [GenerationTask(GenerationParams(JobKind.IMAGINE, prompt, negative=negative, width=64, height=64,
                                             model="shapes", seed=seed, loras=loras)) for prompt in prompts]
    return [image for [image] in generator.generate(tasks)]


RINGS = ["a red ring on a blue background", "a yellow ring on a black background",
         "a white ring on a green background", "a purple ring on an orange background"]
CROSSES = [prompt.replace("ring", "cross") for prompt in RINGS]


def shapes_drawn(generator: DiffusersGenerator, prompts: list[str],
                 loras: tuple[tuple[str, float], ...] = ()) -> list[str]:
    """The shape read back from each picture: `prompts` in one call per seed, seeds 1 to 4."""
    return [describe(image).shape for seed in range(1, 5) for image in imagine(generator, prompts, seed, loras)]


def png_bytes_of(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- what the picture shows ------------------------------------------------------------------------


def test_each_lora_teaches_the_model_a_shape_it_cannot_draw(shapes: DiffusersGenerator) -> None:
    for shape, prompts in (("ring", RINGS), ("cross", CROSSES)):
        without = shapes_drawn(shapes, prompts)
        with_lora = shapes_drawn(shapes, prompts, ((shape, 1.0),))
        assert without.count(shape) <= 3, (shape, without)  # the checker now and then reads a blob so
        assert with_lora.count(shape) >= 9, (shape, with_lora)  # (16 pictures each)


def test_weight_zero_gives_the_bytes_of_no_lora(shapes: DiffusersGenerator, models_dir: Path) -> None:
    prompt = ["a yellow ring on a black background"]
    imagine(shapes, prompt, 3, (("ring", 1.0),))  # the adapter is loaded and was active
    at_zero = imagine(shapes, prompt, 3, (("ring", 0.0),))[0]
    without = imagine(shapes, prompt, 3)[0]
    fresh = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=models_dir)  # never saw a LoRA
    assert png_bytes_of(at_zero) == png_bytes_of(without) == png_bytes_of(imagine(fresh, prompt, 3)[0])
    halfway = imagine(shapes, prompt, 3, (("ring", 0.5),))[0]
    assert png_bytes_of(halfway) != png_bytes_of(without)


def test_two_loras_combine_each_drawing_its_own_shape(shapes: DiffusersGenerator) -> None:
    both = (("cross", 1.0), ("ring", 1.0))
    drawn = shapes_drawn(shapes, [*RINGS, *CROSSES], both)  # one call per seed holds both kinds of prompt
    rings = [shape for index, shape in enumerate(drawn) if index % 8 < 4]
    crosses = [shape for index, shape in enumerate(drawn) if index % 8 >= 4]
    # Each LoRA still draws its shape beside the other (at full weight they interfere: bench/quality.py),
    # more often than without it.
    assert rings.count("ring") > shapes_drawn(shapes, RINGS, (("cross", 1.0),)).count("ring"), rings
    assert crosses.count("cross") > shapes_drawn(shapes, CROSSES, (("ring", 1.0),)).count("cross"), crosses
    assert rings.count("ring") >= 4 and crosses.count("cross") >= 3, (rings, crosses)


def test_the_diffusers_peft_format_of_a_lora_draws_the_same(shapes: DiffusersGenerator, installed: ExtraNetworks,
                                                           tmp_path: Path) -> None:
    kohya = load_file(str(installed.lora("ring").path))
    unet = shapes._pipeline("shapes", JobKind.IMAGINE).unet
    modules = {name.replace(".", "_"): name for name, _ in unet.named_modules()}
    peft = {}
    for key, tensor in kohya.items():
        module, _, part = key.removeprefix("lora_unet_").partition(".")
        if part == "alpha":
            continue
        peft[f"unet.{modules[module]}.{'lora_A' if part == 'lora_down.weight' else 'lora_B'}.weight"] = tensor
    (tmp_path / "loras").mkdir()
    save_file(peft, tmp_path / "loras" / "ring_peft.safetensors")
    both_formats = ExtraNetworks(tmp_path / "loras", None)
    assert lora_text_width(read_safetensors_header(tmp_path / "loras" / "ring_peft.safetensors")) == 64
    generator = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=shapes.cache_dir,
                                   networks=both_formats)
    prompt = ["a red ring on a blue background"]
    for seed in (1, 2):
        ours = imagine(generator, prompt, seed, (("ring_peft", 1.0),))[0]
        theirs = imagine(shapes, prompt, seed, (("ring", 1.0),))[0]
        assert describe(ours) == describe(theirs)


def test_a_lora_for_another_family_fails_the_job_naming_it(tmp_path: Path, models_dir: Path) -> None:
    (tmp_path / "loras").mkdir()
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{block}.lora_down.weight": torch.zeros(1, 768), f"{block}.lora_up.weight": torch.zeros(320, 1),
               f"{block}.alpha": torch.tensor(1.0)}, tmp_path / "loras" / "sd15_style.safetensors")
    generator = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=models_dir,
                                   networks=ExtraNetworks(tmp_path / "loras", None))
    with pytest.raises(GenerationFailed) as failed:
        imagine(generator, ["a red circle on a blue background"], 1, (("sd15_style", 1.0),))
    assert failed.value.message == ("LoRA 'sd15_style' is for SD 1.x models, and model 'shapes' is a model with "
                                    "64-wide text; use a LoRA made for shapes (/loras says what each is for)")
    assert "\n" not in failed.value.message


def test_the_embedding_word_draws_what_it_encodes(shapes: DiffusersGenerator) -> None:
    crimson = [describe(image).colour for seed in SEEDS
               for image in imagine(shapes, ["a crimson circle on a blue background"], seed)]
    red = [describe(image).colour for seed in SEEDS
           for image in imagine(shapes, ["a red circle on a blue background"], seed)]
    assert crimson.count("red") >= 5 and red.count("red") >= 5, (crimson, red)
    plain = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=shapes.cache_dir)  # no embeddings
    unknown = [describe(image).colour for seed in SEEDS
               for image in imagine(plain, ["a crimson circle on a blue background"], seed)]
    assert unknown.count("red") <= 2, unknown


def test_the_embedding_word_works_in_the_negative_prompt(shapes: DiffusersGenerator) -> None:
    prompt = ["a circle on a blue background"]  # no colour asked for: the model picks one, sometimes red
    plain = [describe(image).colour for seed in SEEDS for image in imagine(shapes, prompt, seed)]
    not_crimson = [describe(image) for seed in SEEDS for image in imagine(shapes, prompt, seed, negative="crimson")]
    not_red = [describe(image) for seed in SEEDS for image in imagine(shapes, prompt, seed, negative="red")]
    assert "red" in plain and not any(drawn.colour == "red" for drawn in not_crimson)
    assert not_crimson == not_red


def test_embeddings_leave_prompts_without_their_word_unchanged(shapes: DiffusersGenerator) -> None:
    plain = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=shapes.cache_dir)
    prompt = ["a green square on a white background"]
    assert png_bytes_of(imagine(shapes, prompt, 5)[0]) == png_bytes_of(imagine(plain, prompt, 5)[0])


def test_automatic1111_pt_and_diffusers_embeddings_load_like_the_safetensors_one(
        shapes: DiffusersGenerator, installed: ExtraNetworks, tmp_path: Path) -> None:
    vectors = load_file(str(installed.embeddings()["crimson"].path))["emb_params"]
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone()}, "name": "scarlet",
                "step": 400, "sd_checkpoint": None, "sd_checkpoint_name": "shapes"}, folder / "scarlet.pt")
    save_file({"<ruby>": vectors.clone()}, folder / "ruby.safetensors")  # diffusers' learned_embeds layout
    generator = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=shapes.cache_dir,
                                   networks=ExtraNetworks(None, folder))
    reference = png_bytes_of(imagine(shapes, ["a crimson square on a black background"], 2)[0])
    for word in ("scarlet", "ruby"):
        assert png_bytes_of(imagine(generator, [f"a {word} square on a black background"], 2)[0]) == reference


def test_an_embedding_file_changed_under_the_same_name_is_reloaded_and_used(
        shapes: DiffusersGenerator, installed: ExtraNetworks, tmp_path: Path) -> None:
    """A worker keeps its embeddings loaded; a file written again (a retrained word) must draw its new
    vectors, exactly as a fresh worker loading that file would."""
    crimson = load_file(str(installed.embeddings()["crimson"].path))["emb_params"]
    folder, fresh_folder = tmp_path / "embeddings", tmp_path / "fresh"
    folder.mkdir()
    fresh_folder.mkdir()
    generator = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=shapes.cache_dir,
                                   networks=ExtraNetworks(None, folder))
    save_file({"emb_params": crimson.clone()}, folder / "tint.safetensors")
    before = png_bytes_of(imagine(generator, ["a tint square on a black background"], 2)[0])
    changed = crimson.flip(0).contiguous()  # the same number of vectors, other values
    save_file({"emb_params": changed}, folder / "tint.safetensors")
    os.utime(folder / "tint.safetensors", ns=(1, 1))  # a new mtime even on a coarse-clocked file system
    after = png_bytes_of(imagine(generator, ["a tint square on a black background"], 2)[0])
    save_file({"emb_params": changed.clone()}, fresh_folder / "tint.safetensors")
    fresh = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=shapes.cache_dir,
                               networks=ExtraNetworks(None, fresh_folder))
    assert after == png_bytes_of(imagine(fresh, ["a tint square on a black background"], 2)[0]) != before
# --- the grammar and the files ---------------------------------------------------------------------


@pytest.fixture
def parser(installed: ExtraNetworks) -> CommandParser:
    settings = Settings()
    return CommandParser(settings.limits, settings.models, settings.generation.default_model,
                         settings.generation.default_sampler, networks=installed)


def generate(parser: CommandParser, text: str) -> GenerationParams:
    command = parser.parse(text)
    assert isinstance(command, GenerateCommand)
    return command.params


def test_lora_tags_and_flags_become_the_jobs_loras_sorted_by_name(parser: CommandParser) -> None:
    params = generate(parser, "/imagine a red <lora:ring:0.8> ring on a blue background --lora cross --seed 4")
    assert params.prompt == "a red ring on a blue background"
    assert params.loras == (("cross", 1.0), ("ring", 0.8))
    same = generate(parser, "/imagine a red ring on a blue background --lora ring:0.8 --lora=cross:1 --seed 4")
    assert same.batch_key() == params.batch_key()
    assert generate(parser, "/imagine a red ring <LoRA:ring>").loras == (("ring", 1.0),)
    assert generate(parser, "/imagine a red ring --lora RING:-0.5").loras == (("ring", -0.5),)
    other = generate(parser, "/imagine a red ring on a blue background --lora ring:0.7 --lora cross --seed 4")
    assert other.batch_key() != params.batch_key()


@pytest.mark.parametrize(("text", "message"), [
    ("/imagine a ring <lora:rnig:1>", "unknown LoRA 'rnig' (did you mean ring?); /loras lists them"),
    ("/imagine a ring --lora ring:lots", "LoRA 'ring': the weight must be a number from -5 to 5 (got 'lots')"),
    ("/imagine a ring --lora ring:9", "LoRA 'ring': the weight must be a number from -5 to 5 (got '9')"),
    ("/imagine a ring <lora:ring:1> --lora ring:0.5", "LoRA 'ring' was given twice; give it once, with one weight"),
    ("/imagine a ring --no <lora:ring:1>", "<lora:NAME:WEIGHT> tags go in the prompt, not in the negative prompt"),
    ("/imagine <lora:ring:1>", "/imagine needs a prompt besides its <lora:...> tags, e.g. /imagine a ring "
                               "<lora:ring:0.8>"),
    ("/imagine a ring <lora:ring:1:0.5>", "write a LoRA as NAME:WEIGHT, e.g. <lora:cyan:0.8> or --lora cyan:0.8 "
                                          "(got 'ring:1:0.5'); separate text-encoder and UNet weights are not "
                                          "supported"),
    ("/imagine a ring <hypernet:anime:1>", "hypernetworks (<hypernet:anime:1>) are not supported; LoRAs are: "
                                           "<lora:NAME:WEIGHT>"),
    ("/loras please", "/loras takes nothing after it; use a LoRA with <lora:NAME:WEIGHT> in the prompt"),
])
def test_bad_loras_are_one_line_errors_naming_what_to_change(parser: CommandParser, text: str, message: str) -> None:
    with pytest.raises(InvalidCommand) as refused:
        parser.parse(text)
    assert refused.value.message == message


def test_a_lora_of_another_family_is_refused_before_it_is_queued(tmp_path: Path) -> None:
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 1280)},
              tmp_path / "xl_detail.safetensors")
    settings = Settings()  # the tests' models: builtin:tiny, an SD 1.x model
    parser = CommandParser(settings.limits, settings.models, settings.generation.default_model,
                           settings.generation.default_sampler, networks=ExtraNetworks(tmp_path, None))
    with pytest.raises(InvalidCommand) as refused:
        parser.parse("/imagine a lighthouse <lora:xl_detail:0.7>")
    assert refused.value.message == ("LoRA 'xl_detail' is for SDXL models, and model 'tiny' is an SD 1.x model; "
                                     "use a LoRA made for tiny (/loras says what each is for)")


def test_pickled_loras_are_refused_with_why(tmp_path: Path) -> None:
    (tmp_path / "old.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(InvalidCommand, match=r"^LoRA 'old' is a pickle file, which can run code when loaded"):
        ExtraNetworks(tmp_path, None).lora("old")


def test_the_listing_says_what_each_file_is_for(installed: ExtraNetworks, tmp_path: Path) -> None:
    text = installed.listing()
    assert "  cross  for builtin:shapes" in text and "  ring  for builtin:shapes" in text
    assert "  crimson  for models with 64-wide text" in text
    (tmp_path / "loras").mkdir()
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 768)},
              tmp_path / "loras" / "xl.safetensors")
    assert "  xl  for SDXL models" in ExtraNetworks(tmp_path / "loras", None).listing()
    assert ExtraNetworks(None, None).listing().startswith("No LoRAs are installed")


def test_the_png_parameters_carry_the_loras_as_automatic1111_writes_them(installed: ExtraNetworks) -> None:
    params = GenerationParams(JobKind.IMAGINE, "a crimson ring on a blue background", seed=7, width=64, height=64,
                              model="shapes", loras=(("cross", 0.5), ("ring", 1.0)))
    text = a1111_parameters(params, 7, installed.a1111_hashes(params))
    ring, cross = (addnet_hash(installed.lora(name).path) for name in ("ring", "cross"))
    assert text.splitlines()[0] == "a crimson ring on a blue background <lora:cross:0.5> <lora:ring:1>"
    fields = parse_a1111_parameters(text)
    assert fields["Lora hashes"] == f"cross: {cross}, ring: {ring}"
    assert fields["TI hashes"].startswith("crimson: ") and len(fields["TI hashes"]) == len("crimson: ") + 12
    assert f'Lora hashes: "cross: {cross}, ring: {ring}"' in text


# --- through the service, the worker and the console ----------------------------------------------


@pytest.fixture
async def shapes_core(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch,
                      installed: ExtraNetworks) -> Core:
    monkeypatch.setenv("EASEL_MODELS", json.dumps({"shapes": SHAPES["shapes"].model_dump()}))
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "shapes")
    settings = load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir,
                                            "lora_dir": installed.lora_dir,
                                            "embeddings_dir": installed.embeddings_dir},
                             generation={"poll_interval_ms": 50, "progress_every_s": 0}, http={"port": 0})
    core = await open_core(settings)
    yield core
    await core.close()


async def chat(core: Core, line: str, generator: DiffusersGenerator | None = None) -> tuple[str, object]:
    """Type one line into Alice's console chat, while a burst worker (with `generator`) drains the queue."""
    import asyncio

    out = io.StringIO()
    handled = asyncio.create_task(ConsoleChat(core, out, requester=alice(), progress=False).handle(line))
    while not handled.done():
        if generator is not None:
            await Worker(core.queue, generator, core.store, core.settings, worker_id="test:1").run(burst=True)
        await asyncio.sleep(0.01)
    return out.getvalue(), handled.result()


async def test_a_job_with_loras_from_the_console_to_the_png(shapes_core: Core, shapes: DiffusersGenerator) -> None:
    _, job = await chat(shapes_core, "/imagine a red ring on a blue background <lora:ring:1> --seed 3", shapes)
    assert job.status is JobStatus.SUCCEEDED and job.params.loras == (("ring", 1.0),)
    fields = parse_a1111_parameters(read_parameters(job.images[0].path))
    assert fields["Prompt"] == "a red ring on a blue background <lora:ring:1>"
    assert fields["Lora hashes"] == f"ring: {addnet_hash(shapes.networks.lora('ring').path)}"
    shown, _ = await chat(shapes_core, f"/job {job.id}")
    assert "  loras     <lora:ring:1>" in shown
    listing, _ = await chat(shapes_core, "/loras")
    assert listing.startswith("LoRAs (add <lora:NAME:WEIGHT> to the prompt, or --lora NAME:WEIGHT):")


async def test_jobs_share_a_call_only_when_their_lora_sets_are_equal(shapes_core: Core) -> None:
    lines = ["/imagine a red ring on a blue background <lora:ring:1>", "/imagine a red circle on a blue background",
             "/imagine a white cross <lora:ring:1> --lora cross:0.5", "/imagine a blue ring --lora ring"]
    for line in lines:
        await shapes_core.service.submit(alice(), shapes_core.parser.parse(line))  # type: ignore[arg-type]
    batches = []
    while batch := await shapes_core.queue.claim_batch("test:1", 4):
        batches.append(sorted(job.params.prompt for job in batch))
    assert batches == [["a blue ring", "a red ring on a blue background"], ["a red circle on a blue background"],
                       ["a white cross"]]


def test_loaded_loras_count_in_the_memory_budget(models_dir: Path, installed: ExtraNetworks) -> None:
    generator = DiffusersGenerator(SHAPES, device="cpu", dtype="float32", cache_dir=models_dir, networks=installed)
    imagine(generator, ["a ring"], 1)
    weights = generator._loaded_bytes()
    imagine(generator, ["a ring"], 1, (("cross", 1.0), ("ring", 1.0)))
    adapters = generator._loaded_networks["shapes"].adapters
    loaded = generator._loaded_networks["shapes"]  # the LoRAs, and the original weights kept to unfuse them
    assert len(adapters) == 2 and generator._loaded_bytes() == weights + loaded.adapter_bytes
    assert loaded.adapter_bytes > sum(adapters.values())
    generator.options.memory_budget_mb = 1  # less than the model: every LoRA not in use goes, the model stays
    imagine(generator, ["a ring"], 1, (("ring", 1.0),))
    assert list(adapters) == [f"lora_{installed.short_hash(installed.lora('ring'))}"]
    assert generator.loaded_models == ["shapes"]


async def test_the_http_api_lists_loras_and_takes_them_in_the_prompt(shapes_core: Core) -> None:
    async with serving(shapes_core) as server:
        token, _ = await shapes_core.apikeys.create("tests")
        async with server.client(token) as client:
            listed = (await client.get("/v1/loras")).json()
            a1111_listed = (await client.get("/sdapi/v1/loras")).json()
            job = (await client.post("/v1/jobs", json={"kind": "imagine", "seed": 2,
                                                       "prompt": "a red ring <lora:ring:0.75> on a blue background"}))
            refused = await client.post("/v1/jobs", json={"command": "/imagine a ring --lora ringg"})
    assert [entry["name"] for entry in listed["loras"]] == ["cross", "ring"]
    assert listed["loras"][1]["for"] == "builtin:shapes" and len(listed["loras"][1]["hash"]) == 12
    assert [entry["name"] for entry in listed["embeddings"]] == ["crimson"]
    assert [entry["name"] for entry in a1111_listed] == ["cross", "ring"]  # what A1111 clients offer
    assert job.status_code == 202, job.text
    assert job.json()["prompt"] == "a red ring on a blue background"
    assert job.json()["params"]["loras"] == [{"name": "ring", "weight": 0.75}]
    assert refused.status_code == 400 and "unknown LoRA 'ringg' (did you mean ring?)" in refused.text
