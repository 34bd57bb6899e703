"""AUTOMATIC1111's attention syntax, read into weighted pieces of text (no torch here: the worker's
generation/prompt_embeds.py turns the pieces into prompt embeddings, the grammar checks the weights).

    a (red) circle          red weighs 1.1; ((red)) 1.21, each pair multiplies by 1.1
    a [red] circle          red weighs 1 / 1.1; [[red]] 1 / 1.21
    a (red:1.5) circle      red weighs 1.5; nested groups multiply: ((red:1.5)) is 1.65
    a \\(red\\) circle        literal brackets: \\( \\) \\[ \\] and \\\\ for a backslash
    a red circle BREAK on a blue background
                            BREAK (upper case) ends a 75-token chunk early: the rest starts a new one

As in AUTOMATIC1111, brackets that do not pair up are forgiven rather than refused: an unclosed `(` or
`[` weighs everything after it, and a `)` or `]` with nothing open is plain text (so "a smile :)" is
just text). The weighting itself, and the 75-token chunks, are generation/prompt_embeds.py's.

Example:
    >>> parse_attention("a (red:1.5) circle")
    [[Fragment(text='a ', weight=1.0), Fragment(text='red', weight=1.5), Fragment(text=' circle', weight=1.0)]]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMPHASIS = 1.1  # what one pair of ( ) multiplies by; one pair of [ ] divides by it
MIN_WEIGHT, MAX_WEIGHT = 0.0, 3.0  # past about 2 pictures turn to noise; below 0 means nothing in CLIP's space

# One token of the syntax per match, in order of precedence. The weighted close `:1.5)` is tried
# before a lone `:`, which is text ("16:9", "style: oil").
_TOKEN = re.compile(r"""
    \\(?P<escaped>[\\()\[\]])                                   # \( \) \[ \] \\ : the character itself
  | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)           # :1.5) closes a weighted ( group
  | (?P<bracket>[()\[\]])
  | (?P<text>[^\\()\[\]:]+|[\\:])
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    """A piece of prompt text and the attention it gets (1.0 = as written)."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class WeightedGroup:
    """A `(text:weight)` as the user wrote it, for the grammar's range check."""

    text: str
    weight: float


def parse_attention(prompt: str) -> list[list[Fragment]]:
    """The prompt as sections (split at BREAK), each a list of fragments with their weights.

    Neighbouring fragments of equal weight are merged, so a prompt without any syntax is one
    fragment of weight 1.0 per section, exactly its text.
    """
    pieces: list[_Piece] = []  # weights are multiplied in place as groups close
    rounds: list[int] = []  # where each open ( starts in `pieces`
    squares: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece.weight *= factor

    for match in _TOKEN.finditer(prompt):
        bracket, weight = match["bracket"], match["weight"]
        if match["escaped"] is not None:
            pieces.append(_Piece(match["escaped"]))
        elif weight is not None and rounds:
            weigh(rounds.pop(), float(weight))
        elif bracket == "(":
            rounds.append(len(pieces))
        elif bracket == "[":
            squares.append(len(pieces))
        elif bracket == ")" and rounds:
            weigh(rounds.pop(), EMPHASIS)
        elif bracket == "]" and squares:
            weigh(squares.pop(), 1 / EMPHASIS)
        else:  # text, or a close with nothing open: text as typed
            for number, part in enumerate(_BREAK.split(match[0])):
                if number:
                    pieces.append(_Piece(None))
                pieces.append(_Piece(part))
    for start in rounds:  # unclosed: as if closed at the end
        weigh(start, EMPHASIS)
    for start in squares:
        weigh(start, 1 / EMPHASIS)
    return _sections(pieces)


def weighted_groups(prompt: str) -> list[WeightedGroup]:
    """Every explicit `(text:weight)` of the prompt, outermost last, for range checks."""
    groups: list[WeightedGroup] = []
    opened: list[int] = []
    for match in _TOKEN.finditer(prompt):
        if match["bracket"] == "(":
            opened.append(match.start())
        elif match["bracket"] == ")" and opened:
            opened.pop()
        elif match["weight"] is not None and opened:
            start = opened.pop()
            groups.append(WeightedGroup(prompt[start + 1 : match.start()].strip(), float(match["weight"])))
    return groups


@dataclass
class _Piece:
    text: str | None  # None: a BREAK
    weight: float = 1.0


def _sections(pieces: list[_Piece]) -> list[list[Fragment]]:
    sections: list[list[Fragment]] = [[]]
    for piece in pieces:
        if piece.text is None:
            sections.append([])
            continue
        current = sections[-1]
        if current and current[-1].weight == piece.weight:
            current[-1] = Fragment(current[-1].text + piece.text, piece.weight)
        elif piece.text:
            current.append(Fragment(piece.text, piece.weight))
    return [section or [Fragment("")] for section in sections]
