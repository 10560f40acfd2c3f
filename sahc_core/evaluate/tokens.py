"""Streaming tokenization: token ids of a text of any size, chunk by chunk, stopping at a token cap.

Tokenizing a 200 MB text in one call costs the tokenizer's per-token bookkeeping for the whole text
(21 GB for SmolLM2's fast tokenizer) even when only the first 1,000 tokens are wanted. Here the text is
cut into chunks of about :data:`CHUNK_CHARS` characters, each chunk is tokenized on its own, and the
loop stops once ``max_tokens`` ids are there; peak memory is one chunk's bookkeeping plus the ids
(int64), whatever the text size.

Exactness. The ids must be those of one call on the whole text. A cut at character ``c`` is *stable*
when the tokens of ``text[:c]`` followed by those of ``text[c:]`` are the tokens of ``text``. Cuts are
only made at candidate positions where pre-tokenizers start a new piece (after a lone newline that
follows a non-space, or before a space between two non-spaces), and each candidate is verified on its
neighbourhood before it is used: with ``L = text[c-W:c]`` and ``R = text[c:c+W]`` (``W`` =
:data:`CONTEXT_CHARS`), the tokens of ``L + R`` must begin with the tokens of ``L``. Every chunk
after the first is tokenized *with* its ``W`` characters of left context, whose tokens are then
dropped (checked to be a prefix again), so a tokenizer whose output depends on where its input
starts (a SentencePiece ``▁`` prepended to the first word) sees a mid-text start exactly as the
one-shot call does. Tokenization is local (byte-level BPE never merges across pre-token
boundaries), so a cut verified on ``2 W`` characters is stable for the whole text. Memory stays
bounded for every text: where no candidate verifies within a chunk (:data:`MAX_TRIES` tries; a
"word" longer than a chunk, such as a base64 blob), the chunk is cut hard at its length, and only
the few ids at that cut may differ from one call. Special tokens the tokenizer adds around a text (a BOS, an EOS) are found by
comparing one short text with and without them and are added once, at the start and (when the whole
text was read) at the end.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor

from sahc_core.errors import CorpusError

#: Characters per chunk (about 250k tokens of English for a 49k-vocabulary BPE).
CHUNK_CHARS = 1 << 20
#: Characters of context on each side of a candidate cut, and of left context per chunk.
CONTEXT_CHARS = 512
#: Candidate cuts tried per chunk before the chunk is cut hard.
MAX_TRIES = 64
#: Most chunks merged back when a cut turns out unstable (bounds the characters of one call).
MAX_MERGED = 4
#: Chunk characters per wanted token when a cap is set (English BPE averages about 4).
_CHARS_PER_TOKEN = 16
_CANDIDATE = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")
_PROBE = "Probe text, 12 words."


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """``(prefix, suffix)``: the special-token ids the tokenizer adds before and after any text."""
    bare = _encode(tokenizer, _PROBE)
    full = tokenizer(_PROBE, return_attention_mask=False, verbose=False)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise AssertionError("the tokenizer's special tokens change the text's own tokens")


def _stable(tokenizer, text: str, cut: int) -> bool:
    """Does cutting ``text`` at ``cut`` keep the tokens of its neighbourhood (see module docstring)?"""
    left = text[max(0, cut - CONTEXT_CHARS): cut]
    head = _encode(tokenizer, left)
    return _encode(tokenizer, left + text[cut : cut + CONTEXT_CHARS])[: len(head)] == head


def _next_cut(tokenizer, text: str, target: int, span: int) -> int:
    """The first verified stable cut in ``[target, target + span)``; ``target`` itself (a hard cut) if none."""
    if target >= len(text):
        return len(text)
    for tries, m in enumerate(_CANDIDATE.finditer(text, target, min(len(text), target + span))):
        if tries >= MAX_TRIES:
            break
        if _stable(tokenizer, text, m.start()):
            return m.start()
    return target


def _chunk_ids(tokenizer, text: str, begin: int, end: int) -> list[int] | None:
    """Ids of ``text[begin:end]`` tokenized with its left context (None when the context's tokens move)."""
    left = text[max(0, begin - CONTEXT_CHARS): begin]
    ids = _encode(tokenizer, left + text[begin:end])
    if not left:
        return ids
    head = _encode(tokenizer, left)
    return ids[len(head):] if ids[: len(head)] == head else None


def token_ids(tokenizer, text: str, max_tokens: int | None = None, chunk_chars: int = CHUNK_CHARS) -> Tensor:
    """Token ids of ``text`` as one call ``tokenizer(text)`` gives them, streamed (1-D int64).

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    text : str
    max_tokens : int, optional
        Stop once this many ids are known (the result is the first ``max_tokens`` ids).
    chunk_chars : int
        Characters per chunk (tests use small chunks to cross many cuts).

    Raises
    ------
    CorpusError
        When the text is empty or blank.
    """
    if not text or text.isspace():
        raise CorpusError("the text to evaluate is empty; give a corpus with text in it.")
    if chunk_chars < 2 * CONTEXT_CHARS:
        raise ValueError(f"chunk_chars must be at least {2 * CONTEXT_CHARS}, got {chunk_chars}.")
    if max_tokens is not None:
        chunk_chars = min(chunk_chars, max(2 * CONTEXT_CHARS, _CHARS_PER_TOKEN * max_tokens))
    prefix, suffix = special_affixes(tokenizer)
    chunks: list[tuple[int, np.ndarray]] = []  # (first character, ids) per chunk, in order
    count, begin = len(prefix), 0
    while begin < len(text) and (max_tokens is None or count < max_tokens):
        end = _next_cut(tokenizer, text, begin + chunk_chars, chunk_chars)
        ids = _chunk_ids(tokenizer, text, begin, end)
        while ids is None and chunks and end - chunks[-1][0] <= MAX_MERGED * chunk_chars:
            begin, dropped = chunks.pop()  # the cut at `begin` moved its context's tokens: merge backwards
            count -= len(dropped)
            ids = _chunk_ids(tokenizer, text, begin, end)
        if ids is None:  # no stable cut near `begin` (a "word" longer than a chunk): cut hard, stay bounded
            ids = _encode(tokenizer, text[begin:end])
        chunks.append((begin, np.asarray(ids, dtype=np.int64)))
        count += len(ids)
        begin = end
    parts = [np.asarray(prefix, dtype=np.int64), *(ids for _, ids in chunks)]
    if begin >= len(text):
        parts.append(np.asarray(suffix, dtype=np.int64))
    out = np.concatenate(parts)
    return torch.from_numpy(out[:max_tokens] if max_tokens is not None else out)
