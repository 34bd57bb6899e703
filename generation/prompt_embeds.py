"""Prompts to prompt embeddings the AUTOMATIC1111 way, for every Stable Diffusion family.

A prompt is read as AUTOMATIC1111 reads it (bot/attention.py: `(word:1.3)`, `[word]`, `\\(`, BREAK),
tokenized with the pipeline's own tokenizers (after textual-inversion words are expanded, as diffusers
does), and cut into chunks of 75 tokens as AUTOMATIC1111 cuts them: a chunk that fills up within 20
tokens of a comma ends after that comma, BREAK ends one early, and each chunk is encoded on its own
between its start and end tokens. The chunks' embeddings are concatenated, so a prompt of any length
is read whole (a plain pipeline call cuts it after 77 tokens).

compel (damian0815/compel) does the encoding: it picks each family's hidden state (SD 1.x/2.x the last
layer, normalised; SDXL the penultimate of both text encoders) and applies the per-token weights
against the empty prompt's embedding. Its own prompt parser reads InvokeAI's syntax (`word++`,
`(word)1.3`, `.blend()`), not AUTOMATIC1111's, and its chunker splits at sentences, so Easel hands it
token ids it has read and chunked itself.

A prompt without any syntax gives exactly the embedding the pipeline would have made from the text,
so plain prompts draw the same pictures as before. Prompts of a different number of chunks cannot
share one pipeline call; `chunk_count` tells the generator how to split a batch (padding a prompt
with empty chunks would change its picture with its batch mates).

Example:
    >>> encoder = PromptEncoder(pipe)
    >>> arguments = encoder.encode(["a (red:1.4) circle"], [""])  # prompt_embeds, negative_prompt_embeds
    >>> pipe(**arguments, num_inference_steps=20)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from compel import EmbeddingsProvider, ReturnedEmbeddingsType
from diffusers import DiffusionPipeline

from bot.attention import Fragment, parse_attention

CHUNK_TOKENS = 75  # tokens of prompt text per chunk: CLIP's 77 less its start and end tokens
COMMA_BACKTRACK = 20  # a full chunk ends after its last comma when that comma is this close (A1111's default)


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    last_comma: int = -1  # index in `tokens` of the last comma, -1: none


class PromptEncoder:
    """Encodes prompts with one pipeline's tokenizers and text encoders, as they are now (LoRA and
    textual-inversion weights loaded into them are used)."""

    def __init__(self, pipe: DiffusionPipeline, device: torch.device | str | None = None) -> None:
        """`device`: where the text encoders run, when the caller knows it. Without it, the pipeline is
        asked: diffusers then walks every module of the pipeline for offload hooks, which took 2 to 3 ms
        on builtin:tiny, more than encoding its prompt."""
        self.pipe = pipe
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        hidden = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED if self.sdxl \
            else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if self.sdxl:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        if device is None:
            device = getattr(pipe, "_execution_device", None) or pipe.device
        self.providers = [EmbeddingsProvider(tokenizer=tokenizer, text_encoder=encoder, truncate=False,
                                             returned_embeddings_type=hidden, device=device)
                          for tokenizer, encoder in pairs if tokenizer is not None and encoder is not None]
        self.device = device
        # Each text's chunks, by encoder: chunk_count and _encode both read them, for every image of a batch.
        # An encoder serves one pipeline call, so the tokenizers (and their textual inversions) cannot change.
        self._chunked: dict[tuple[int, str], list[_Chunk]] = {}

    def chunk_count(self, prompt: str, negative: str) -> int:
        """How many 77-token chunks an image's embeddings take: its prompt's or its negative's, the longer."""
        provider = self.providers[0]
        return max(len(self._chunks(provider, text)) for text in (prompt, negative))

    def encode(self, prompts: Sequence[str], negatives: Sequence[str]) -> dict[str, torch.Tensor]:
        """Keyword arguments for the pipeline call, one row per image: `prompt_embeds` and
        `negative_prompt_embeds` (and SDXL's pooled embeddings). Every image must have the same
        `chunk_count`."""
        if len(prompts) != len(negatives):
            raise ValueError(f"`prompts` and `negatives` must pair up, but there are {len(prompts)} and "
                             f"{len(negatives)}")
        # Each distinct text is encoded once: the images of one `--n 4` job share their prompt, and most
        # images of a batch share the empty negative prompt. The padding runs without autograd too: it may
        # compute compel's empty-prompt embedding for the first time.
        with torch.no_grad():
            encoded = {text: self._encode(text) for text in dict.fromkeys([*prompts, *negatives])}
            rows = [self._paired(encoded[prompt], encoded[negative])
                    for prompt, negative in zip(prompts, negatives, strict=True)]
        lengths = {row[0].shape[1] for row in rows}
        if len(lengths) > 1:
            raise ValueError(f"prompts of different chunk counts cannot share one call ({sorted(lengths)} tokens); "
                             "split the batch by chunk_count first")
        arguments = {"prompt_embeds": torch.cat([row[0] for row in rows]),
                     "negative_prompt_embeds": torch.cat([row[1] for row in rows])}
        if self.sdxl:
            arguments["pooled_prompt_embeds"] = torch.cat([row[2] for row in rows])
            arguments["negative_pooled_prompt_embeds"] = torch.cat([row[3] for row in rows])
        return arguments

    # -- one image ---------------------------------------------------------------------------------

    def _paired(self, positive: tuple[torch.Tensor, torch.Tensor | None],
                negative: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """An image's (prompt embeds, negative embeds[, pooled, negative pooled]) from its two texts'
        _encode, the two padded to one length."""
        length = max(positive[0].shape[1], negative[0].shape[1])
        padded = (self._pad(positive[0], length), self._pad(negative[0], length))
        if self.sdxl:
            return (*padded, positive[1], negative[1])
        return padded

    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One text's embeddings (both encoders' side by side for SDXL) and SDXL's pooled embedding."""
        per_encoder, pooled = [], None
        for number, provider in enumerate(self.providers):
            chunks = self._chunks(provider, text)
            token_ids = torch.tensor([token for chunk in chunks for token in chunk.tokens], dtype=torch.long,
                                     device=self.device)
            weights = torch.tensor([weight for chunk in chunks for weight in chunk.weights], dtype=torch.float32,
                                   device=self.device)
            per_encoder.append(provider.build_weighted_embedding_tensor(token_ids, weights,
                                                                        torch.ones_like(token_ids)))
            if number == 1:  # SDXL's second encoder also gives the pooled embedding, of the first chunk
                pooled = provider.text_encoder(token_ids[: provider.max_token_count].unsqueeze(0),
                                               output_hidden_states=True)[0]
        length = max(embeds.shape[1] for embeds in per_encoder)
        embeds = torch.cat([self._pad(embeds, length, provider) for embeds, provider
                            in zip(per_encoder, self.providers, strict=True)], dim=-1)
        return embeds, pooled

    def _pad(self, embeds: torch.Tensor, length: int, provider: EmbeddingsProvider | None = None) -> torch.Tensor:
        """`embeds` with empty-prompt chunks appended up to `length` tokens (as AUTOMATIC1111 pads)."""
        missing = (length - embeds.shape[1]) // self.providers[0].max_token_count
        if not missing:
            return embeds
        # A whole row (no `provider`) pads with every encoder's empty chunk side by side.
        empty = provider.empty_z if provider is not None else torch.cat([p.empty_z for p in self.providers], dim=-1)
        return torch.cat([embeds, empty.to(embeds.dtype).repeat(embeds.shape[0], missing, 1)], dim=1)

    # -- reading and chunking ------------------------------------------------------------------------

    def _chunks(self, provider: EmbeddingsProvider, text: str) -> list[_Chunk]:
        """The text's tokens in 77-token chunks (start token, up to 75 tokens, end token, padding)."""
        key = (self.providers.index(provider), text)
        if key not in self._chunked:
            comma = provider.tokenizer.convert_tokens_to_ids(",</w>")
            chunks: list[_Chunk] = []
            for section in parse_attention(text):
                chunks.extend(self._section_chunks(provider, section, comma))
            self._chunked[key] = [self._closed(provider, chunk) for chunk in chunks]
        return self._chunked[key]

    def _section_chunks(self, provider: EmbeddingsProvider, section: list[Fragment], comma: int) -> list[_Chunk]:
        """The chunks of one BREAK-free section: full ones end after a comma within COMMA_BACKTRACK tokens."""
        convert = getattr(self.pipe, "maybe_convert_prompt", None)  # multi-vector textual inversions
        texts = [convert(fragment.text, provider.tokenizer) if convert else fragment.text for fragment in section]
        token_lists = provider.get_token_ids(texts, include_start_and_end_markers=False)
        chunks, chunk = [], _Chunk()
        for tokens, fragment in zip(token_lists, section, strict=True):
            for token in tokens:
                if len(chunk.tokens) == CHUNK_TOKENS:
                    if chunk.last_comma >= 0 and CHUNK_TOKENS - chunk.last_comma <= COMMA_BACKTRACK:
                        cut = chunk.last_comma + 1
                        chunks.append(_Chunk(chunk.tokens[:cut], chunk.weights[:cut]))
                        chunk = _Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                    else:
                        chunks.append(chunk)
                        chunk = _Chunk()
                if token == comma:
                    chunk.last_comma = len(chunk.tokens)
                chunk.tokens.append(token)
                chunk.weights.append(fragment.weight)
        if chunk.tokens or not chunks:
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _closed(provider: EmbeddingsProvider, chunk: _Chunk) -> _Chunk:
        """The chunk between its start and end tokens, padded with the tokenizer's pad token to 77."""
        tokens = provider.bos_sequence + chunk.tokens + provider.eos_sequence
        pad = provider.max_token_count - len(tokens)
        return _Chunk(tokens + [provider.tokenizer.pad_token_id] * pad,
                      [1.0] * len(provider.bos_sequence) + chunk.weights + [1.0] * (len(provider.eos_sequence) + pad))
