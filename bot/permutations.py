"""Permutation prompts, Midjourney's syntax: `a {red, green} {circle, square}` is four prompts.

Each `{...}` group lists options separated by commas (or by `|`, as the Dynamic Prompts extension of
AUTOMATIC1111 writes them); the prompt is repeated once per combination, in reading order:

    a {red, green} {circle, square}
    -> a red circle, a red square, a green circle, a green square

Groups may nest (`a {red, {dark, light} blue} circle` is three prompts); an empty option leaves the
group out (`a {, red} circle`); `\\,` is a comma inside an option and `\\{` `\\}` are literal braces.
The grammar makes one job of each combination (bot/grammar.py) and counts them before expanding
anything, so `{a,b} {a,b} {a,b} ...` is refused by its count, not by running out of memory.

Example:
    >>> expand_permutations("a {red, green} {circle, square}")
    ['a red circle', 'a red square', 'a green circle', 'a green square']
"""

from __future__ import annotations

import itertools

from bot.errors import InvalidCommand


def count_permutations(prompt: str) -> int:
    """How many prompts `prompt` expands to (1 when it has no `{...}` group)."""
    _head, options, tail = _first_group(prompt)
    if options is None:
        return 1
    return sum(count_permutations(option) for option in options) * count_permutations(tail)


def expand_permutations(prompt: str) -> list[str]:
    """Every combination, in reading order, with the `{}` syntax gone and its spaces tidied.

    Check `count_permutations` first: this builds every prompt.
    """
    return [_tidy(text) for text in _expand(prompt)]


def check_permutations(prompt: str, limit: int) -> int:
    """The number of prompts, or InvalidCommand when it is over `limit`."""
    count = count_permutations(prompt)
    if count > limit:
        raise InvalidCommand(f"the prompt's {{...}} options make {count} combinations, one job each; the "
                             f"limit is {limit} per command (limits.max_permutations): use fewer options")
    return count


def _expand(prompt: str) -> list[str]:
    head, options, tail = _first_group(prompt)
    if options is None:
        return [_unescape(prompt)]
    rests = _expand(tail)
    return [_unescape(head) + chosen + rest for option in options for chosen in _expand(option)
            for rest in rests]


def _first_group(prompt: str) -> tuple[str, list[str] | None, str]:
    """(text before the first top-level group, its options, text after it); options None: no group."""
    start = _find_unescaped(prompt, "{", 0)
    if start < 0:
        if _find_unescaped(prompt, "}", 0) >= 0:
            raise InvalidCommand("the prompt has a } without its {; permutations are written {red, green}, "
                                 "and \\} is a literal brace")
        return prompt, None, ""
    depth, position = 0, start
    separators: list[int] = []
    bars: list[int] = []
    while position < len(prompt):
        char = prompt[position]
        if char == "\\":
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1 and char == ",":
            separators.append(position)
        elif depth == 1 and char == "|":
            bars.append(position)
        position += 1
    else:
        raise InvalidCommand("the prompt has a { that is never closed; permutations are written {red, green}, "
                             "and \\{ is a literal brace")
    cuts = bars or separators  # `{a, b | c}` is two options: "a, b" and "c"
    bounds = [start, *cuts, position]
    options = [prompt[low + 1 : high] for low, high in itertools.pairwise(bounds)]
    return prompt[:start], options, prompt[position + 1 :]


def _find_unescaped(text: str, char: str, start: int) -> int:
    position = start
    while position < len(text):
        if text[position] == "\\":
            position += 2
            continue
        if text[position] == char:
            return position
        position += 1
    return -1


def _unescape(text: str) -> str:
    """`\\,` `\\{` `\\}` become the character; every other backslash stays (AUTOMATIC1111's `\\(`)."""
    for char in ",{}|":
        text = text.replace("\\" + char, char)
    return text


def _tidy(text: str) -> str:
    """Spaces an empty option leaves behind: "a  circle" -> "a circle"."""
    return " ".join(text.split())
