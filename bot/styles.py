"""Styles: AUTOMATIC1111's `styles.csv`, so a server owner can bring the file they already have.

The file (`storage.styles_file`, default `<data_dir>/styles.csv`) has a header row and the columns
`name,prompt,negative_prompt`, as AUTOMATIC1111 writes it; other columns are ignored. A style's
prompt holds `{prompt}` where the user's prompt goes; without it, the style is added after the
user's prompt with a comma. Its negative prompt joins the user's the same way. `--style NAME`
applies one (repeatable: in the order given); `/styles` lists them.

The file is read again whenever it changes, so an edit needs no restart; a missing file is an empty
list. Names match without regard to case, spaces, `-` or `_` ("Cinematic Photo" is --style
cinematic_photo).

Example:
    >>> book = StyleBook(Path("data/styles.csv"))   # name,prompt,negative_prompt
    >>> book.apply(["watercolor"], "a red fox", "")  #   watercolor,"{prompt}, watercolor painting",photo
    ('a red fox, watercolor painting', 'photo')
"""

from __future__ import annotations

import csv
import difflib
import io
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from bot.errors import ConfigError, InvalidCommand

PROMPT_PLACE = "{prompt}"
_NAME_SEPARATORS = re.compile(r"[\s_-]+")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative: str = ""


def merge_style(style_text: str, user_text: str) -> str:
    """The user's text put into a style's text as AUTOMATIC1111 does: at `{prompt}`, else after it
    with a comma. `merge_style("{prompt}, oil painting", "a fox")` is "a fox, oil painting"."""
    if PROMPT_PLACE in style_text:
        return style_text.replace(PROMPT_PLACE, user_text)
    return ", ".join(part for part in (user_text.strip(), style_text.strip()) if part)


def style_key(name: str) -> str:
    """What names are matched by: "Cinematic Photo", "cinematic_photo" and "cinematic-photo" are one."""
    return _NAME_SEPARATORS.sub(" ", name.strip()).lower()


def style_flag(name: str) -> str:
    """The one word `--style` takes for a style: "Cinematic Photo" is cinematic_photo."""
    return style_key(name).replace(" ", "_")


class StyleBook:
    """The styles of one styles.csv, read again when the file changes. Safe to share between threads."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: tuple[float, int] | None = None  # the file's (mtime, size) when last read
        self._styles: dict[str, Style] = {}
        self._lock = threading.Lock()

    def styles(self) -> list[Style]:
        """Every style, in the file's order."""
        return list(self._current().values())

    def get(self, name: str) -> Style:
        """The style called `name`; InvalidCommand naming the closest ones when there is none."""
        styles = self._current()
        style = styles.get(style_key(name))
        if style is not None:
            return style
        if not styles:
            where = f" ({self.path})" if self.path is not None else ""
            raise InvalidCommand(f"there are no styles yet; the server's operator adds them to styles.csv{where}")
        close = difflib.get_close_matches(style_key(name), list(styles), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(styles[key].name for key in close)}?)" if close else ""
        raise InvalidCommand(f"there is no style {name[:40]!r}{hint}; /styles lists them")

    def apply(self, names: list[str], prompt: str, negative: str) -> tuple[str, str]:
        """The prompt and negative prompt with each named style merged in, in order."""
        for name in names:
            style = self.get(name)
            prompt = merge_style(style.prompt, prompt) if style.prompt else prompt
            negative = merge_style(style.negative, negative) if style.negative else negative
        return prompt, negative

    def check(self) -> None:
        """Read the file now: ConfigError (start-up) when it exists but cannot be read as styles."""
        self._current()

    def _current(self) -> dict[str, Style]:
        if self.path is None:
            return {}
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise ConfigError(f"storage.styles_file {self.path} cannot be read: {error.strerror}") from None
        seen = (stat.st_mtime, stat.st_size)
        with self._lock:
            if seen != self._seen:
                self._styles = read_styles(self.path)
                self._seen = seen
            return self._styles


def read_styles(path: Path) -> dict[str, Style]:
    """The styles of an AUTOMATIC1111 styles.csv, by `style_key`. ConfigError says what is wrong."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as Excel writes, is not part of a name
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"storage.styles_file {path} cannot be read as UTF-8 text: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = {column.strip().lower() for column in reader.fieldnames or ()}
    if "name" not in columns:
        raise ConfigError(f"storage.styles_file {path} needs a header row name,prompt,negative_prompt "
                          f"(AUTOMATIC1111's styles.csv); its first row is {', '.join(reader.fieldnames or ())!r}")
    styles: dict[str, Style] = {}
    try:
        for row in reader:
            fields = {(key or "").strip().lower(): (value or "") for key, value in row.items()
                      if not isinstance(value, list)}
            style = Style(fields.get("name", "").strip(), fields.get("prompt", "").strip(),
                          fields.get("negative_prompt", "").strip())
            if style.name and (style.prompt or style.negative):  # A1111's "None" placeholder row has no text
                styles.setdefault(style_key(style.name), style)
    except csv.Error as error:
        raise ConfigError(f"storage.styles_file {path} is not valid CSV (line {reader.line_num}): {error}") from None
    return styles


def describe_styles(styles: list[Style], limit: int = 60) -> str:
    """/styles: one line per style, for every platform."""
    if not styles:
        return "No styles yet: the operator adds them to styles.csv (name,prompt,negative_prompt)."
    lines = [f"{len(styles)} style(s); use one with --style NAME (repeat it for several), e.g. "
             f"--style {style_flag(styles[0].name)}:"]
    for style in styles:
        prompt = _clipped(style.prompt, limit) or "(negative prompt only)"
        negative = f"  (not: {_clipped(style.negative, 40)})" if style.negative else ""
        lines.append(f"  {style_flag(style.name)}: {prompt}{negative}")
    return "\n".join(lines)


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
