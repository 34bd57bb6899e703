"""Prompt syntax as a user writes it: AUTOMATIC1111 weights, styles.csv and permutation prompts.

What the model makes of weights, long prompts and styles is in tests/test_prompt_weights.py; here is
what the text means, what each mistake is told, and how many jobs a permutation prompt queues.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from adapters.console import ConsoleChat
from bot.attention import Fragment, parse_attention
from bot.bootstrap import Core, open_core
from bot.config import LimitsConfig, ModelConfig, Settings, load_settings
from bot.domain import GenerateCommand, StylesCommand
from bot.errors import ConfigError, QueueFull, QuotaExceeded
from bot.grammar import CommandParser
from bot.permutations import expand_permutations
from bot.styles import StyleBook
from tests.conftest import alice, bob
from tests.test_grammar import error_of, imagine

MODELS = {"tiny": ModelConfig(source="builtin:tiny", default_width=64, default_height=64)}
# An AUTOMATIC1111 styles.csv as the web UI writes it: a BOM, a placeholder row, {prompt} or not.
STYLES_CSV = ('\ufeffname,prompt,negative_prompt\n'
              'None,,\n'
              'Night Sky,"{prompt} on a black background","blurry"\n'
              'meadow,on a green background,\n'
              'oil,"oil painting of {prompt}, thick brush strokes","photo, 3d render"\n')


def parser_with(tmp_path: Path, csv_text: str = STYLES_CSV, **limits: object) -> CommandParser:
    path = tmp_path / "styles.csv"
    path.write_text(csv_text, encoding="utf-8")
    return CommandParser(LimitsConfig(**limits), MODELS, "tiny", "euler", StyleBook(path))



# -- AUTOMATIC1111 attention ---------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "fragments"), [
    ("a red circle", [("a red circle", 1.0)]),
    ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
    ("a ((red)) circle", [("a ", 1.0), ("red", 1.21), (" circle", 1.0)]),
    ("a [red] circle", [("a ", 1.0), ("red", 1 / 1.1), (" circle", 1.0)]),
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("((red:1.5))", [("red", 1.65)]),
    ("(a (red:2) circle)", [("a ", 1.1), ("red", 2.2), (" circle", 1.1)]),
    ("a \\(red\\) circle \\[x\\]", [("a (red) circle [x]", 1.0)]),
    ("a smile :) and 16:9", [("a smile :) and 16:9", 1.0)]),  # a close with nothing open is text
    ("a (red circle", [("a ", 1.0), ("red circle", 1.1)]),  # unclosed: weighs the rest, as in A1111
])
def test_attention_reads_as_automatic1111_does(prompt: str, fragments: list[tuple[str, float]]) -> None:
    [section] = parse_attention(prompt)
    assert [(f.text, pytest.approx(f.weight)) for f in section] == fragments


def test_break_starts_a_new_chunk() -> None:
    assert parse_attention("a red circle BREAK on a (blue:1.2) background") == [
        [Fragment("a red circle")], [Fragment("on a "), Fragment("blue", 1.2), Fragment(" background")]]
    assert len(parse_attention("a breakfast, a Break")) == 1  # only the upper-case word


def test_weights_stay_in_the_prompt_and_out_of_range_ones_are_refused(tmp_path: Path) -> None:
    parser = parser_with(tmp_path)
    assert imagine(parser, "a (red:1.3) [square]").params.prompt == "a (red:1.3) [square]"
    assert error_of(parser, "/imagine a (red:9) circle") == \
        "the weight in (red:9) in the prompt must be from 0 to 3, e.g. (red:1.3)"
    assert "in the negative prompt" in error_of(parser, "/imagine a circle --no (blur:-1)")


def test_inline_negative_groups_still_work_beside_weights(tmp_path: Path) -> None:
    params = imagine(parser_with(tmp_path), "a (red:1.2) circle (-(bad hands:1.3) -blur) at night").params
    assert params.prompt == "a (red:1.2) circle at night"
    assert params.negative == "(bad hands:1.3), blur"
    escaped = imagine(parser_with(tmp_path), "a sign saying \\(-no entry\\)").params
    assert escaped.prompt == "a sign saying \\(-no entry\\)" and escaped.negative == ""


# -- styles ----------------------------------------------------------------------------------------------


def test_a_style_puts_the_prompt_where_it_says(tmp_path: Path) -> None:
    parser = parser_with(tmp_path)
    night = imagine(parser, "a white square --style night_sky").params
    assert (night.prompt, night.negative) == ("a white square on a black background", "blurry")
    meadow = imagine(parser, "a white square (-grey) --style Meadow").params  # no {prompt}: after, with a comma
    assert (meadow.prompt, meadow.negative) == ("a white square, on a green background", "grey")


def test_styles_repeat_in_the_order_given(tmp_path: Path) -> None:
    params = imagine(parser_with(tmp_path), "a fox --style oil --style night-sky --no text").params
    assert params.prompt == "oil painting of a fox, thick brush strokes on a black background"
    assert params.negative == "text, photo, 3d render, blurry"


def test_an_unknown_style_names_the_closest_and_slash_styles(tmp_path: Path) -> None:
    assert error_of(parser_with(tmp_path), "/imagine a fox --style nite_sky") == \
        "there is no style 'nite_sky' (did you mean Night Sky?); /styles lists them"


def test_the_styles_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    parser = parser_with(tmp_path)
    assert parser.parse("/styles") == StylesCommand()
    with (tmp_path / "styles.csv").open("a", encoding="utf-8") as file:
        file.write('sunny,"{prompt} on a yellow background",\n')
    assert imagine(parser, "a red circle --style sunny").params.prompt == "a red circle on a yellow background"
    assert [style.name for style in parser.styles.styles()] == ["Night Sky", "meadow", "oil", "sunny"]


def test_no_styles_file_is_an_empty_list_and_a_broken_one_stops_start_up(tmp_path: Path) -> None:
    empty = CommandParser(LimitsConfig(), MODELS, "tiny", "euler", StyleBook(tmp_path / "missing.csv"))
    assert empty.styles.styles() == []
    assert "there are no styles yet" in error_of(empty, "/imagine a fox --style oil")
    with pytest.raises(ConfigError, match="needs a header row name,prompt,negative_prompt"):
        parser_with(tmp_path, "oil;{prompt} oil painting\n")


async def test_slash_styles_lists_each_style_with_the_word_to_write(tmp_path: Path, models_dir: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "styles.csv").write_text(STYLES_CSV, encoding="utf-8")
    core = await open_core(load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir}))
    try:
        out = io.StringIO()
        await ConsoleChat(core, out, progress=False).handle("/styles")
    finally:
        await core.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "3 style(s); use one with --style NAME (repeat it for several), e.g. --style night_sky:"
    assert lines[1] == "  night_sky: {prompt} on a black background  (not: blurry)"
    assert lines[2] == "  meadow: on a green background"


def test_the_styles_file_is_a_setting(tmp_path: Path) -> None:
    settings = Settings(storage={"data_dir": tmp_path})
    assert settings.storage.styles_path == tmp_path / "styles.csv"
    elsewhere = Settings(storage={"data_dir": tmp_path, "styles_file": tmp_path / "shared" / "styles.csv"})
    assert elsewhere.storage.styles_path == tmp_path / "shared" / "styles.csv"


# -- permutations ------------------------------------------------------------------------------------------


def test_permutations_expand_in_reading_order() -> None:
    assert expand_permutations("a {red, green} {circle, square}") == [
        "a red circle", "a red square", "a green circle", "a green square"]
    assert expand_permutations("a {red, {dark, light} blue} circle") == [
        "a red circle", "a dark blue circle", "a light blue circle"]
    assert expand_permutations("a {, big} {red|green} x\\, y \\{z\\}") == [
        "a red x, y {z}", "a green x, y {z}", "a big red x, y {z}", "a big green x, y {z}"]


def test_a_permutation_prompt_is_one_command_per_combination(tmp_path: Path) -> None:
    command = imagine(parser_with(tmp_path), "a {red, green} circle (-blur) --style meadow --n 2 --seed 7")
    assert [(p.prompt, p.negative, p.n, p.seed) for p in command.every_params()] == [
        ("a red circle, on a green background", "blur", 2, 7),
        ("a green circle, on a green background", "blur", 2, 7)]


def test_permutation_mistakes_are_told(tmp_path: Path) -> None:
    parser = parser_with(tmp_path, max_permutations=8)
    assert error_of(parser, "/imagine a {red, green, blue} {circle, square, triangle}") == (
        "the prompt's {...} options make 9 combinations, one job each; the limit is 8 per command "
        "(limits.max_permutations): use fewer options")
    assert "a { that is never closed" in error_of(parser, "/imagine a {red, green circle")
    assert "a } without its {" in error_of(parser, "/imagine a red} circle")


def test_a_reference_link_is_not_a_permutation(tmp_path: Path) -> None:
    command = parser_with(tmp_path).parse("/edit {https://cdn.discordapp.com/a/b.png} the {cat, dog} in snow")
    assert isinstance(command, GenerateCommand)
    assert command.reference_urls == ("https://cdn.discordapp.com/a/b.png",)
    assert [p.prompt for p in command.every_params()] == ["the cat in snow", "the dog in snow"]


async def test_a_permutation_queues_one_job_per_combination_each_with_its_own_seed(core: Core) -> None:
    result = await core.service.submit(alice(), core.parser.parse("/imagine a {red, green} {circle, square} --n 2"))
    jobs = [each.job for each in result.every]
    assert [job.params.prompt for job in jobs] == ["a red circle", "a red square", "a green circle", "a green square"]
    seeds = [seed for job in jobs for seed in job.seeds]
    assert len(set(seeds)) == 8  # every image of the set has a seed of its own
    assert [each.position for each in result.every] == [1, 2, 3, 4]
    assert {job.id for job in await core.service.list_jobs()} == {job.id for job in jobs}


async def test_a_given_seed_numbers_the_set_so_it_can_be_made_again(core: Core) -> None:
    command = core.parser.parse("/imagine a {red, green, blue} circle --seed 40 --n 2")
    result = await core.service.submit(alice(), command)  # type: ignore[arg-type]
    assert [each.job.seeds for each in result.every] == [[40, 41], [42, 43], [44, 45]]


async def test_a_permutation_is_queued_whole_or_not_at_all(core: Core) -> None:
    core.settings.queue.max_queued_per_user = 3
    await core.service.submit(alice(), core.parser.parse("/imagine a fox"))
    with pytest.raises(QueueFull, match=r"^This prompt makes 4 jobs \(one per \{\.\.\.\} option\)\. You already "
                       r"have 3 jobs waiting"):
        await core.service.submit(alice(), core.parser.parse("/imagine a {red, green} {circle, square}"))
    assert len(await core.service.list_jobs()) == 1
    core.settings.quota.tiers["user"].per_minute_units = 0.05  # each 64x64 job costs about 0.016
    with pytest.raises(QuotaExceeded, match=r"^This prompt makes 4 jobs .* 0\.05 units a minute\): this job alone "
                       r"costs 0\.06 units"):
        await core.service.submit(bob(), core.parser.parse("/imagine a {red, green} {circle, square}"))
    assert len(await core.service.list_jobs()) == 1


async def test_quota_prices_every_job_of_a_permutation(core: Core) -> None:
    one = await core.service.estimate(alice(), core.parser.parse("/imagine a red circle --n 2"))
    four = await core.service.estimate(alice(), core.parser.parse("/imagine a {red, green} {circle, square} --n 2"))
    assert four.cost == pytest.approx(4 * one.cost) and four.images == 8
    status = await core.service.quota(alice(), core.parser.parse("/imagine a {red, green} circle"))
    assert status.cost == pytest.approx(2 * (await core.service.quota(alice(), core.parser.parse(
        "/imagine a red circle"))).cost)
