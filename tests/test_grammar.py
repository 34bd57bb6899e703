"""The command grammar as a user meets it: what a command means, and what each mistake is told."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.config import LimitsConfig, ModelConfig, Settings
from bot.domain import (
    SAMPLERS,
    CancelCommand,
    GenerateCommand,
    HelpCommand,
    JobCommand,
    JobKind,
    JobsCommand,
    QuotaCommand,
)
from bot.errors import ConfigError, InvalidCommand
from bot.grammar import FLAGS, MAX_SEED, SHAPES_EXAMPLES, CommandParser, fit_size, split_command

LIMITS = LimitsConfig()  # steps 1..50 (20), cfg 1..20 (7), n 1..4 (1), sides 64..1024, strength 0.05..1
MODELS = {
    "tiny": ModelConfig(source="builtin:tiny", default_width=64, default_height=64),
    "sd15": ModelConfig(source="stable-diffusion-v1-5/stable-diffusion-v1-5", default_width=512,
                        default_height=512),
}
FAST = settings(max_examples=150, deadline=None)


@pytest.fixture
def parser() -> CommandParser:
    return CommandParser(LIMITS, MODELS, default_model="sd15", default_sampler="euler")


def imagine(parser: CommandParser, text: str) -> GenerateCommand:
    command = parser.parse(f"/imagine {text}")
    assert isinstance(command, GenerateCommand)
    return command


def error_of(parser: CommandParser, text: str) -> str:
    with pytest.raises(InvalidCommand) as caught:
        parser.parse(text)
    assert "\n" not in caught.value.message
    return caught.value.message


# -- defaults and each flag ---------------------------------------------------------------------------


def test_defaults_come_from_limits_and_the_default_model(parser: CommandParser) -> None:
    command = imagine(parser, "a red fox in the snow")
    params = command.params
    assert params.kind is JobKind.IMAGINE
    assert params.prompt == "a red fox in the snow"
    assert params.negative == ""
    assert (params.steps, params.cfg, params.n) == (20, 7.0, 1)
    assert (params.sampler, params.model, params.width, params.height) == ("euler", "sd15", 512, 512)
    assert params.seed is None
    assert params.strength is None
    assert command.size_from_input is False


def test_edit_and_inpaint_default_strength_and_size_from_the_input(parser: CommandParser) -> None:
    for kind in ("edit", "inpaint"):
        command = parser.parse(f"/{kind} make it winter")
        assert isinstance(command, GenerateCommand)
        assert command.params.kind == kind
        assert command.params.strength == LIMITS.default_strength
        assert command.size_from_input is True
        assert (command.params.width, command.params.height) == (512, 512)


def test_edit_with_a_size_or_ratio_keeps_it(parser: CommandParser) -> None:
    assert parser.parse("/edit x --size 256x320").size_from_input is False  # type: ignore[union-attr]
    assert parser.parse("/edit x --ar 1:1").size_from_input is False  # type: ignore[union-attr]


def test_every_flag_is_parsed(parser: CommandParser) -> None:
    params = parser.parse_generation(
        JobKind.EDIT,
        "a castle --no blurry, text --seed 4 --steps 30 --cfg 7.5 --size 640x384 --n 2 "
        "--sampler DPMPP_2M --model tiny --strength 0.6",
    ).params
    assert params.prompt == "a castle"
    assert params.negative == "blurry, text"
    assert (params.seed, params.steps, params.cfg, params.n) == (4, 30, 7.5, 2)
    assert (params.width, params.height) == (640, 384)
    assert (params.sampler, params.model, params.strength) == ("dpmpp_2m", "tiny", 0.6)


def test_aspect_ratio_keeps_about_the_model_area(parser: CommandParser) -> None:
    params = imagine(parser, "a beach --ar 16:9").params
    assert (params.width, params.height) == fit_size(16, 9, 512 * 512, LIMITS) == (680, 384)
    portrait = imagine(parser, "a tower --ar 2:3").params
    assert portrait.width < portrait.height


def test_equals_sign_and_phone_dashes_work(parser: CommandParser) -> None:
    assert imagine(parser, "a cat --seed=5").params.seed == 5
    assert imagine(parser, "a cat —seed 5").params.seed == 5  # iOS turns -- into an em dash
    assert imagine(parser, "a cat –steps=9").params.steps == 9  # en dash
    assert imagine(parser, "a cat —no=blurry hands").params.negative == "blurry hands"


def test_dashes_used_as_punctuation_stay_in_the_prompt(parser: CommandParser) -> None:
    assert imagine(parser, "a cat — sleeping, 1990–2000").params.prompt == "a cat — sleeping, 1990–2000"


def test_prompt_words_may_follow_flags(parser: CommandParser) -> None:
    params = imagine(parser, "a cat --seed 4 on a mat").params
    assert (params.prompt, params.seed) == ("a cat on a mat", 4)


# -- prompts are free text ----------------------------------------------------------------------------


def test_apostrophes_and_unbalanced_quotes_are_prompt_text(parser: CommandParser) -> None:
    assert imagine(parser, 'don\'t "stop me now --n 2').params.prompt == 'don\'t "stop me now'
    assert imagine(parser, "a 'single quote").params.prompt == "a 'single quote"


def test_whitespace_is_normalised(parser: CommandParser) -> None:
    assert imagine(parser, "  a   cat\n\tin  a hat  ").params.prompt == "a cat in a hat"


def test_inline_negative_groups_move_to_the_negative_prompt(parser: CommandParser) -> None:
    params = imagine(parser, "a castle (-bad hands -extra fingers) at night").params
    assert params.prompt == "a castle at night"
    assert params.negative == "bad hands, extra fingers"


def test_inline_groups_combine_with_no(parser: CommandParser) -> None:
    params = imagine(parser, "a castle (-blurry) at night --no watermark, text").params
    assert params.negative == "blurry, watermark, text"


def test_prompt_weighting_parentheses_survive(parser: CommandParser) -> None:
    prompt = "a (red:1.2) rose, ((masterpiece)), [sketch], (well-lit room)"
    assert imagine(parser, prompt).params.prompt == prompt


def test_empty_and_too_long_prompts(parser: CommandParser) -> None:
    assert "needs a prompt" in error_of(parser, "/imagine --seed 4")
    assert "needs a prompt" in error_of(parser, "/imagine (-only negatives)")
    message = error_of(parser, "/imagine " + "a" * 1001)
    assert "1001" in message and "1000" in message


def test_a_missing_prompt_is_met_with_an_example_the_default_model_draws() -> None:
    """builtin:shapes knows only its captions' words: its users are shown one of those, not a fox."""
    shapes = CommandParser(LIMITS, {"shapes": ModelConfig(source="builtin:shapes", default_width=64,
                                                          default_height=64)},
                           default_model="shapes", default_sampler="euler")
    assert error_of(shapes, "/imagine --seed 4") == ("/imagine needs a prompt describing the picture, e.g. "
                                                      "/imagine a red circle on a blue background")
    suggested = error_of(shapes, "/edit").rsplit("e.g. /edit ", 1)[1]
    assert suggested in SHAPES_EXAMPLES and imagine(shapes, suggested).params.prompt == suggested
    assert error_of(CommandParser(LIMITS, MODELS, default_model="sd15", default_sampler="euler"),
                    "/imagine").endswith("e.g. /imagine a lighthouse at dusk, oil painting")


# -- mistakes and their messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("--steps 500", "--steps must be a whole number from 1 to 50 (got 500)"),
        ("--steps 2.5", "--steps must be a whole number from 1 to 50 (got 2.5)"),
        ("--cfg 30", "--cfg must be a number from 1 to 20 (got 30)"),
        ("--cfg nan", "--cfg must be a number from 1 to 20 (got nan)"),
        ("--n 9", "--n must be a whole number from 1 to 4 (got 9)"),
        ("--seed -1", f"--seed must be a whole number from 0 to {MAX_SEED} (got -1)"),
        ("--seed 4294967296", f"--seed must be a whole number from 0 to {MAX_SEED} (got 4294967296)"),
        ("--ar 10:1", "--ar must be a ratio from 1:4 to 4:1 (got 10:1)"),
        ("--ar 0:1", "--ar must be two positive numbers as W:H"),
        ("--ar wide", "--ar must be two positive numbers as W:H"),
        ("--size 500x512", "--size sides must be multiples of 8 (got 500x512)"),
        ("--size 32x512", "--size sides must each be from 64 to 1024 (got 32x512)"),
        ("--size 2048x64", "--size sides must each be from 64 to 1024"),
        ("--size 99999x3", "--size sides must each be from 64 to 1024 (got 99999x3)"),  # no 100000x8 hint
        ("--size big", "--size must be WIDTHxHEIGHT"),
        ("--sampler fast", "--sampler must be one of euler, euler_a"),
        ("--model sdxl", "--model must be one of tiny, sd15; got sdxl"),
    ],
)
def test_out_of_range_values_name_the_flag_and_range(
    parser: CommandParser, flags: str, expected: str
) -> None:
    assert error_of(parser, f"/imagine a cat {flags}").startswith(expected)


def test_strength_range_on_edit(parser: CommandParser) -> None:
    assert error_of(parser, "/edit a cat --strength 2").startswith(
        "--strength must be a number from 0.05 to 1 (got 2)")


def test_too_many_pixels() -> None:
    limits = LimitsConfig(max_pixels=512 * 512)
    parser = CommandParser(limits, {"m": ModelConfig(source="x")}, "m", "euler")
    assert "at most 262144 pixels (got 1024x512" in error_of(parser, "/imagine a --size 1024x512")


def test_strength_on_imagine_says_where_it_belongs(parser: CommandParser) -> None:
    assert "--strength is for /edit and /inpaint" in error_of(parser, "/imagine a cat --strength 0.5")


def test_size_and_aspect_together_are_an_error(parser: CommandParser) -> None:
    assert "--ar or --size, not both" in error_of(parser, "/imagine a cat --ar 1:1 --size 512x512")


def test_unknown_flag_suggests_the_closest(parser: CommandParser) -> None:
    message = error_of(parser, "/imagine a cat --sed 4")
    assert message.startswith("unknown flag --sed (did you mean --seed?)")
    assert "--steps" in message  # lists the known flags
    assert "did you mean --seed?" in error_of(parser, "/imagine a cat —sed 4")


def test_suggestions_for_samplers_and_commands(parser: CommandParser) -> None:
    assert "did you mean euler_a?" in error_of(parser, "/imagine a cat --sampler euler-a")
    message = error_of(parser, "/imagin a cat")
    assert "did you mean /imagine?" in message and "/quota" in message


def test_missing_value_is_an_error(parser: CommandParser) -> None:
    assert error_of(parser, "/imagine a cat --seed").startswith("--seed needs a value")
    assert error_of(parser, "/imagine a cat --seed --steps 4").startswith("--seed needs a value")
    assert error_of(parser, "/imagine a cat --seed=").startswith("--seed needs a value")
    assert error_of(parser, "/imagine a cat --no --seed 4").startswith("--no needs a value")


def test_a_flag_given_twice_is_an_error(parser: CommandParser) -> None:
    assert "--seed was given twice" in error_of(parser, "/imagine a cat --seed 1 --seed=2")
    assert "--no was given twice" in error_of(parser, "/imagine a cat --no x --no y")


# -- the other commands -------------------------------------------------------------------------------


def test_simple_commands(parser: CommandParser) -> None:
    assert parser.parse("/quota") == QuotaCommand()
    assert parser.parse("/help") == HelpCommand()
    assert parser.parse("/job abc123") == JobCommand(job_id="abc123")
    assert parser.parse("/cancel") == CancelCommand()
    assert parser.parse("/cancel abc123") == CancelCommand(job_id="abc123")
    assert parser.parse("/CANCEL") == CancelCommand()


def test_job_needs_an_id(parser: CommandParser) -> None:
    assert "/job needs exactly one job id" in error_of(parser, "/job")
    assert "/job needs exactly one job id" in error_of(parser, "/job 1 2")


def test_commands_must_start_with_a_slash(parser: CommandParser) -> None:
    assert "commands start with a slash" in error_of(parser, "imagine a cat")
    assert "commands start with a slash" in error_of(parser, "   ")


def test_bot_name_suffix_is_stripped(parser: CommandParser) -> None:
    assert parser.parse("/imagine@easelbot a cat").params.prompt == "a cat"  # type: ignore[union-attr]
    assert parser.parse("/help@easelbot") == HelpCommand()
    assert split_command("/imagine@EaselBot a cat --n 2") == ("imagine", "EaselBot", "a cat --n 2")
    assert split_command("/quota") == ("quota", None, "")
    assert split_command("/imagine\na cat") == ("imagine", None, "a cat")


def test_help_lists_every_command_flag_and_range(parser: CommandParser) -> None:
    text = parser.help_text()
    for word in ("/imagine", "/edit", "/inpaint", "/quota", "/job", "/cancel", "/help", *SAMPLERS, "sd15"):
        assert word in text
    for flag in FLAGS:
        assert f"--{flag} " in text
    assert "1 to 50" in text and "0.05 to 1" in text and "64 to 1024" in text
    assert "Examples:" in text


def test_jobs_lists_mine_and_takes_nothing(parser: CommandParser) -> None:
    assert parser.parse("/jobs") == JobsCommand()
    with pytest.raises(InvalidCommand, match=r"^/jobs takes nothing after it; /job <id> shows one job$"):
        parser.parse("/jobs 5")
    assert "/jobs  your recent jobs" in parser.help_text()


def test_help_says_what_size_an_edit_comes_out(parser: CommandParser) -> None:
    shapes = CommandParser(LIMITS, {"shapes": ModelConfig(source="builtin:shapes", default_width=64,
                                                          default_height=64)}, "shapes", "euler")
    assert "512x384 in gives 88x64 on shapes" in shapes.help_text()
    assert "512x384 in gives 592x440 on sd15" in parser.help_text()  # about 512x512's pixels, 4:3


def test_help_takes_a_platforms_own_form_of_the_picture_commands(parser: CommandParser) -> None:
    forms = {"edit": "/edit <image file> <prompt>  redraw it", "inpaint": "/inpaint <a> <b> <prompt>  repaint",
             "outpaint": "/outpaint <a> [prompt] --zoom X  paint around it",
             "animate": "/animate [<a>] <prompt>  a clip", "edit example": "/edit photo.png make it winter"}
    text = parser.help_text(forms)
    assert ("  /edit <image file> <prompt>  redraw it\n  /inpaint <a> <b> <prompt>  repaint\n"
            "  /outpaint <a> [prompt] --zoom X  paint around it\n  /animate [<a>] <prompt>  a clip\n") in text
    assert text.endswith("\n  /edit photo.png make it winter")
    assert "attach" not in text.split("Reference images")[0]


def test_help_examples_parse(parser: CommandParser) -> None:
    examples = parser.help_text().split("Examples:\n")[1].splitlines()
    for line in examples:
        assert isinstance(parser.parse(line.split("   (")[0].strip()), GenerateCommand)


def test_from_settings_uses_the_configuration() -> None:
    parser = CommandParser.from_settings(Settings())
    assert parser.parse("/imagine a cat").params.model == "tiny"  # type: ignore[union-attr]


def test_impossible_configuration_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="default_model"):
        CommandParser(LIMITS, MODELS, "missing", "euler")
    with pytest.raises(ConfigError, match=r"models\.odd"):
        CommandParser(LIMITS, {"odd": ModelConfig(source="x", default_width=500)}, "odd", "euler")


# -- fit_size -----------------------------------------------------------------------------------------


def test_fit_size_examples() -> None:
    assert fit_size(1, 1, 512 * 512, LIMITS) == (512, 512)
    assert fit_size(16, 9, 512 * 512, LIMITS) == (680, 384)
    assert fit_size(1, 1, 4096 * 4096, LIMITS) == (1024, 1024)  # capped by max_pixels
    assert fit_size(1, 4, 64 * 64, LIMITS) == (64, 256)  # min_side wins over the area


@FAST
@given(
    aspect_w=st.floats(0.01, 100),
    aspect_h=st.floats(0.01, 100),
    area=st.integers(1, 4096 * 4096),
)
def test_fit_size_always_respects_the_limits(aspect_w: float, aspect_h: float, area: int) -> None:
    width, height = fit_size(aspect_w, aspect_h, area, LIMITS)
    assert width % 8 == 0 and height % 8 == 0
    assert LIMITS.min_side <= width <= LIMITS.max_side
    assert LIMITS.min_side <= height <= LIMITS.max_side
    assert width * height <= LIMITS.max_pixels


# -- properties ---------------------------------------------------------------------------------------

PARSER = CommandParser(LIMITS, MODELS, default_model="sd15", default_sampler="euler")
FRAGMENTS = st.sampled_from([
    *(f"--{flag}" for flag in FLAGS), *(f"—{flag}" for flag in FLAGS), "--", "—", "=", ":", "x", "(", ")",
    "(-", "-", "'", '"', "@", "/imagine", "--sed", "--seed=", "16:9", "512x512", "nan", "inf", "1e309",
])
VALUES = st.one_of(st.integers(-10, 5000).map(str), st.floats().map(str), st.text(max_size=8))
COMMAND_NAMES = st.sampled_from(["/imagine", "/edit", "/inpaint", "/quota", "/job", "/cancel", "/help",
                                 "/imagine@bot", "/nope", "", "/mod", "/mod ban", "/mod appeal", "/mod quota x",
                                 "/appeal", "/quota /imagine"])


def assert_within_limits(command: object) -> None:
    if not isinstance(command, GenerateCommand):
        return
    params = command.params
    assert params.prompt and len(params.prompt) <= LIMITS.max_prompt_chars
    assert LIMITS.min_steps <= params.steps <= LIMITS.max_steps
    assert LIMITS.min_cfg <= params.cfg <= LIMITS.max_cfg
    assert 1 <= params.n <= LIMITS.max_n
    assert params.width % 8 == 0 and params.height % 8 == 0
    assert params.width * params.height <= LIMITS.max_pixels
    assert params.sampler in SAMPLERS and params.model in MODELS


@FAST
@given(text=st.text())
def test_any_text_parses_or_raises_invalid_command(text: str) -> None:
    for candidate in (text, f"/imagine {text}", f"/edit {text}"):
        with contextlib.suppress(InvalidCommand):
            assert_within_limits(PARSER.parse(candidate))


@FAST
@given(name=COMMAND_NAMES, parts=st.lists(st.one_of(FRAGMENTS, VALUES), max_size=12),
       joiner=st.sampled_from([" ", "", "="]))
def test_flag_soup_parses_or_raises_invalid_command(name: str, parts: list[str], joiner: str) -> None:
    with contextlib.suppress(InvalidCommand):
        assert_within_limits(PARSER.parse(name + " " + joiner.join(parts)))


@FAST
@given(
    prompt=st.lists(st.text("abcdefgh'\"(:.,", min_size=1, max_size=8), min_size=1, max_size=6).map(" ".join),
    seed=st.integers(0, MAX_SEED),
    steps=st.integers(LIMITS.min_steps, LIMITS.max_steps),
    cfg=st.floats(LIMITS.min_cfg, LIMITS.max_cfg),
    n=st.integers(1, LIMITS.max_n),
    sampler=st.sampled_from(SAMPLERS),
    strength=st.floats(LIMITS.min_strength, LIMITS.max_strength),
    width=st.integers(LIMITS.min_side // 8, 64).map(lambda k: k * 8),
    height=st.integers(LIMITS.min_side // 8, 64).map(lambda k: k * 8),
    dash=st.sampled_from(["--", "—", "–"]),
    separator=st.sampled_from([" ", "="]),
)
def test_valid_commands_round_trip(
    prompt: str, seed: int, steps: int, cfg: float, n: int, sampler: str, strength: float,
    width: int, height: int, dash: str, separator: str,
) -> None:
    steps = max(steps, math.ceil(1 / strength))  # an edit must run at least one denoising step
    values = {"seed": seed, "steps": steps, "cfg": cfg, "n": n, "sampler": sampler.upper(),
              "strength": strength, "size": f"{width}x{height}"}
    flags = " ".join(f"{dash}{name}{separator}{value}" for name, value in values.items())
    params = PARSER.parse(f"/edit {prompt} {flags}").params  # type: ignore[union-attr]
    assert params.prompt == prompt
    assert (params.seed, params.steps, params.cfg, params.n) == (seed, steps, cfg, n)
    assert (params.sampler, params.strength) == (sampler, strength)
    assert (params.width, params.height) == (width, height)


def test_an_edit_too_short_to_run_a_single_step_is_refused_with_the_fix() -> None:
    parser = CommandParser(LimitsConfig(), {"tiny": ModelConfig(source="builtin:tiny", default_width=64,
                                                                default_height=64)}, "tiny", "euler")
    with pytest.raises(InvalidCommand, match=r"--steps 2 with --strength 0\.3 runs no denoising step; "
                                             r"use --steps 4 or more"):
        parser.parse("/edit winter --steps 2 --strength 0.3")
    assert parser.parse("/edit winter --steps 4 --strength 0.3").params.steps == 4
