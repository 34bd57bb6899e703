"""The prompt check: configured words and patterns per category, matched after normalisation.

    check = PromptCheck.from_settings(settings.safety)   # bootstrap passes the embedder, if one is set
    verdict = check.check("a n.u.d.e p0rtrait")
    decision = verdict.decide(nsfw_allowed=False)   # refused: "sexual" is allowed only where NSFW is

Trivial evasions are undone before matching (`variants`): case, accents, look-alike letters from other
scripts and full-width forms, zero-width characters, leetspeak (`s3x`, `n@ked`), and separators inside
a word (`n.u.d.e`, `n u d e`, `nu-de`). Words match whole (so "Essex" is not "sex"), with an optional
plural ending. An optional semantic check compares the prompt with each category's description using a
small local sentence-embedding model, where one is configured and installed; bot.bootstrap loads it
(generation/sentence_embedder.py: the core itself imports no torch) and passes it in.

Every match becomes a safety flag row (bot/policy.py records them); this module only decides.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bot.config import SafetyCategoryConfig, SafetyConfig

# Letters of other scripts that look like Latin ones (after case folding), and Latin letters that
# Unicode does not decompose into a base letter plus an accent.
_LOOK_ALIKES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "һ": "h", "ԁ": "d", "ӏ": "l",
    "ь": "b", "п": "n", "г": "r", "ԛ": "q", "ԝ": "w",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "μ": "u", "ς": "s", "σ": "o",
    # Latin letters without a decomposition
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t", "ƅ": "b", "ɡ": "g", "ß": "ss", "æ": "ae",
    "œ": "oe", "þ": "p",
})
# Leetspeak. `1` and `|` read as either i or l, so both readings are checked.
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s",
         "!": "i", "+": "t", "€": "e", "£": "l"}
_LEET_I = str.maketrans({**_LEET, "1": "i", "|": "i"})
_LEET_L = str.maketrans({**_LEET, "1": "l", "|": "l"})
_HAS_LETTER = re.compile(r"[^\W\d_]")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def fold(text: str) -> str:
    """Case, width, accents, look-alike letters and invisible characters folded away.

    `fold("ＮÜDЕ\u200b")` is `"nude"` (full-width N, Ü with its accent, a Cyrillic Е, a zero-width space).
    """
    text = unicodedata.normalize("NFKC", text).casefold().translate(_LOOK_ALIKES)
    return "".join(char for char in unicodedata.normalize("NFKD", text)
                   if not unicodedata.combining(char) and unicodedata.category(char) != "Cf")


def variants(text: str) -> set[str]:
    """Every reading of `text` the check matches against: folded, then with and without leetspeak,
    with punctuation as spaces ("half-naked" -> "half naked") and removed ("n.u.d.e" -> "nude"), and
    with runs of single letters joined ("n u d e" -> "nude")."""
    folded = fold(text)
    readings = {folded}
    for table in (_LEET_I, _LEET_L):
        # Only words with a letter are read as leetspeak, so "1990" and "4k" stay numbers... mostly.
        readings.add(" ".join(word.translate(table) if _HAS_LETTER.search(word) else word
                              for word in folded.split()))
    result = set()
    for reading in readings:
        for separated in (_PUNCTUATION.sub(" ", reading), _PUNCTUATION.sub("", reading)):
            result.add(_join_single_letters(separated, keep_words=False))
            result.add(_join_single_letters(separated, keep_words=True))
    return result


def _join_single_letters(text: str, keep_words: bool) -> str:
    """Join runs of three or more one-character words: "n u d e cat" -> "nude cat". With `keep_words`,
    the one-letter English words "a" and "i" at either end of a run stay apart: "a n u d e" -> "a nude"."""
    words, out, run = text.split(), [], []
    for word in [*words, ""]:
        if len(word) == 1:
            run.append(word)
            continue
        head, tail = [], []
        if keep_words and len(run) >= 4 and run[0] in "ai":
            head, run = run[:1], run[1:]
        if keep_words and len(run) >= 4 and run[-1] in "ai":
            run, tail = run[:-1], run[-1:]
        out.extend(head)
        if len(run) >= 3:
            out.append("".join(run))
        else:
            out.extend(run)
        out.extend(tail)
        run = []
        if word:
            out.append(word)
    return " ".join(out)


@dataclass(frozen=True)
class PromptMatch:
    """One category found in a prompt."""

    category: str
    action: str  # the category's configured action: block, flag, nsfw_only
    reason_code: str  # matched_word, matched_pattern, semantic_match
    term: str  # the word, the pattern, or the description it was close to
    description: str = ""


@dataclass(frozen=True)
class Decision:
    """What to do with a prompt, and the safety flag rows to record (match, recorded action)."""

    allowed: bool
    records: tuple[tuple[PromptMatch, str], ...]  # recorded actions: block, refuse_here, flag, allow_nsfw
    message: str = ""  # for a refusal: what was found and what the user can do

    @property
    def is_strike_candidate(self) -> bool:
        return any(action == "block" for _, action in self.records)


@dataclass(frozen=True)
class PromptVerdict:
    matches: tuple[PromptMatch, ...]

    def decide(self, nsfw_allowed: bool) -> Decision:
        """Block beats everything; nsfw_only is refused outside NSFW places; flags are only recorded."""
        blocked = [m for m in self.matches if m.action == "block"]
        if blocked:
            first = blocked[0]
            return Decision(False, tuple((m, "block") for m in blocked),
                            f"Your prompt was refused: it matches the category \"{first.category}\""
                            f"{_described(first)} ({_shown_term(first)}), which is not allowed here.")
        nsfw = [m for m in self.matches if m.action == "nsfw_only"]
        if nsfw and not nsfw_allowed:
            first = nsfw[0]
            return Decision(False, tuple((m, "refuse_here") for m in nsfw),
                            f"Your prompt was refused here: it matches the category \"{first.category}\""
                            f"{_described(first)} ({_shown_term(first)}), which is allowed only where NSFW "
                            "content is allowed (for example a channel marked NSFW). Reword it, or ask there.")
        records = [(m, "allow_nsfw") for m in nsfw] + [(m, "flag") for m in self.matches
                                                       if m.action == "flag"]
        return Decision(True, tuple(records))


def _described(match: PromptMatch) -> str:
    return f", {match.description}" if match.description else ""


def _shown_term(match: PromptMatch) -> str:
    if match.reason_code == "matched_word":
        return f"the word \"{match.term}\""
    if match.reason_code == "semantic_match":
        return "its meaning"
    return "a configured pattern"


# -- the check ---------------------------------------------------------------------------------------

Embedder = Callable[[Sequence[str]], Any]  # texts -> an (n, d) array of embeddings


class PromptCheck:
    """Matches prompts against the configured categories. Build once; `check` is cheap and thread-safe."""

    def __init__(self, categories: dict[str, SafetyCategoryConfig], *, enabled: bool = True,
                 embedder: Embedder | None = None, semantic_threshold: float = 0.6) -> None:
        self.enabled = enabled
        self.categories = dict(categories)
        self._words = {name: _word_regex(category.words) for name, category in self.categories.items()}
        self._patterns = {name: [re.compile(p, re.IGNORECASE) for p in category.patterns]
                          for name, category in self.categories.items()}
        self._semantic = (_SemanticCheck(embedder, self.categories, semantic_threshold)
                          if embedder is not None else None)

    @classmethod
    def from_settings(cls, config: SafetyConfig, embedder: Embedder | None = None) -> PromptCheck:
        """The configured check; `embedder` is the loaded `safety.semantic_model`, required when one is set."""
        if config.semantic_model and embedder is None:
            raise ValueError(f"safety.semantic_model is {config.semantic_model!r}: load it "
                             "(generation.sentence_embedder.load_sentence_embedder) and pass it as `embedder`")
        return cls(config.categories, enabled=config.prompt_check, embedder=embedder,
                   semantic_threshold=config.semantic_threshold)

    def check(self, prompt: str) -> PromptVerdict:
        """Every category the prompt matches (at most one match per category)."""
        if not self.enabled or not prompt.strip():
            return PromptVerdict(())
        readings = variants(prompt)
        matches: list[PromptMatch] = []
        for name, category in self.categories.items():
            match = self._match(name, category, readings)
            if match is not None:
                matches.append(match)
        if self._semantic is not None:
            found = {m.category for m in matches}
            matches.extend(m for m in self._semantic.matches(prompt) if m.category not in found)
        return PromptVerdict(tuple(matches))

    def _match(self, name: str, category: SafetyCategoryConfig, readings: set[str]) -> PromptMatch | None:
        words = self._words[name]
        for reading in sorted(readings):  # sorted: the same prompt always reports the same term
            if words is not None and (found := words.search(reading)):
                return PromptMatch(name, category.action, "matched_word", found["word"], category.description)
        for pattern in self._patterns[name]:
            if any(pattern.search(reading) for reading in readings):
                return PromptMatch(name, category.action, "matched_pattern", pattern.pattern,
                                   category.description)
        return None


def _word_regex(words: list[str]) -> re.Pattern[str] | None:
    """One regex for a category's words: whole words, inner spaces flexible, optional plural ending."""
    folded = sorted({" ".join(fold(word).split()) for word in words if word.strip()}, key=len, reverse=True)
    if not folded:
        return None
    alternatives = "|".join(r"\s+".join(re.escape(part) for part in word.split()) for word in folded)
    return re.compile(rf"(?<![^\W_])(?P<word>{alternatives})(?:e?s)?(?![^\W_])")


class _SemanticCheck:
    """Cosine similarity between the prompt and each category's description."""

    def __init__(self, embedder: Embedder, categories: dict[str, SafetyCategoryConfig],
                 threshold: float) -> None:
        import numpy as np

        self._np = np
        self._embed = embedder
        self._threshold = threshold
        self._categories = [(name, c) for name, c in categories.items() if c.description]
        self._descriptions = (self._normalised(embedder([c.description for _, c in self._categories]))
                              if self._categories else None)

    def _normalised(self, vectors: Any) -> Any:
        array = self._np.asarray(vectors, dtype=self._np.float32)
        return array / self._np.maximum(self._np.linalg.norm(array, axis=1, keepdims=True), 1e-12)

    def matches(self, prompt: str) -> list[PromptMatch]:
        if self._descriptions is None:
            return []
        scores = self._descriptions @ self._normalised(self._embed([prompt]))[0]
        return [PromptMatch(name, category.action, "semantic_match", f"{category.description} ({score:.2f})",
                            category.description)
                for (name, category), score in zip(self._categories, scores, strict=True)
                if score >= self._threshold]


# -- images ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageVerdict:
    """The output check flagged one image (generation/safety_checker.py)."""

    category: str  # e.g. "nsfw"
    reason_code: str  # which check said so, e.g. "diffusers_safety_checker", "nudenet:BUTTOCKS_EXPOSED"


# An image's flags are "CATEGORY:ACTION" (e.g. "nsfw:withhold"); these helpers are the one place that
# reads or rewrites them.
WITHHOLD, SPOILER, RELEASED = "withhold", "spoiler", "released"  # RELEASED: a moderator accepted an appeal


def image_action(nsfw_allowed: bool) -> str:
    """A flagged image is never blacked out: spoilered where NSFW is allowed, else withheld with a reason."""
    return SPOILER if nsfw_allowed else WITHHOLD


def flagged_category(flags: Iterable[str], action: str) -> str | None:
    """The category of the flag with `action` (WITHHOLD, SPOILER, RELEASED) among an image's flags, or None."""
    return next((flag.rsplit(":", 1)[0] for flag in flags if flag.endswith(f":{action}")), None)


def released_flags(flags: Iterable[str]) -> list[str]:
    """An image's flags once a moderator has released it: each withhold becomes a release."""
    return [f"{flag.rsplit(':', 1)[0]}:{RELEASED}" if flag.endswith(f":{WITHHOLD}") else flag for flag in flags]
