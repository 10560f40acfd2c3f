"""Streaming tokenization: the streamed ids are the ids of one call, and a token cap bounds the work.

The reference is always ``tokenizer(text)["input_ids"]`` on the whole text (one call). Small chunks
are used so that a text crosses many cuts; three tokenizers cover the three ways a cut can go wrong:
SmolLM2's byte-level BPE (the default model), a BPE with a BOS/EOS template (specials at both ends)
and a SentencePiece-style Metaspace tokenizer that prepends "▁" to the start of its input.
"""
from __future__ import annotations

import random

import pytest

from sahc_core.errors import CorpusError
from sahc_core.evaluate.tokens import CONTEXT_CHARS, token_ids


def _one_call(tok, text: str) -> list[int]:
    return tok(text, return_attention_mask=False, verbose=False)["input_ids"]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from sahc_core.io.default_model import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def default_test_text() -> str:
    from sahc_core.io.corpus import default_corpus

    return default_corpus().test_text


def _trained(kind: str, text: str):
    """A small fast tokenizer trained on ``text``: ``bpe-template`` (BOS/EOS added) or ``metaspace``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"]))
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_streamed_ids_equal_one_call_on_the_whole_default_test_text(smollm2, default_test_text):
    ref = _one_call(smollm2, default_test_text)
    assert len(ref) == 64_021  # the corpus docstring's count
    got = token_ids(smollm2, default_test_text, chunk_chars=4096)  # ~50 cuts across Macbeth and The Tempest
    assert got.dtype.is_floating_point is False and got.tolist() == ref


@pytest.mark.parametrize("max_tokens", [2, 999, 20_000])
def test_a_token_cap_gives_the_first_ids_of_one_call(smollm2, default_test_text, max_tokens):
    ref = _one_call(smollm2, default_test_text)
    assert token_ids(smollm2, default_test_text, max_tokens=max_tokens, chunk_chars=4096).tolist() == ref[:max_tokens]


@pytest.mark.parametrize("kind", ["bpe-template", "metaspace"])
def test_streamed_ids_equal_one_call_for_tokenizers_with_specials_or_a_prepended_marker(kind, default_test_text):
    text = default_test_text[:60_000]
    tok = _trained(kind, text)
    ref = _one_call(tok, text)
    if kind == "bpe-template":
        assert ref[0] == 1 and ref[-1] == 2  # the specials of one call: BOS first, EOS last, once each
    got = token_ids(tok, text, chunk_chars=2 * CONTEXT_CHARS + 100)
    assert got.tolist() == ref
    assert token_ids(tok, text, max_tokens=777, chunk_chars=2 * CONTEXT_CHARS).tolist() == ref[:777]


def test_random_texts_and_chunk_sizes(smollm2, default_test_text):
    """Cuts land in speeches, stage directions, numbers and runs of blank lines alike."""
    rng = random.Random(0)
    for _ in range(4):
        start = rng.randrange(0, len(default_test_text) - 30_000)
        text = default_test_text[start: start + 30_000] + "\n\n\n   12345 ... \n" * 3
        chunk = rng.randrange(2 * CONTEXT_CHARS, 6000)
        assert token_ids(smollm2, text, chunk_chars=chunk).tolist() == _one_call(smollm2, text), (start, chunk)


class _Counting:
    """Wraps a tokenizer and records the length of every text it is asked to tokenize."""

    def __init__(self, tok) -> None:
        self.tok, self.lengths = tok, []

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)


def test_a_token_cap_never_tokenizes_the_whole_text(smollm2, default_test_text):
    """The bound behind `--max-tokens` on a huge corpus: the tokenizer only ever sees small pieces."""
    big = default_test_text * 100  # 20 MB of text
    counting = _Counting(smollm2)
    ids = token_ids(counting, big, max_tokens=1000)
    assert ids.tolist() == _one_call(smollm2, default_test_text[:20_000])[:1000]
    assert max(counting.lengths) < 20_000 and sum(counting.lengths) < 100_000, counting.lengths


def test_a_text_without_any_stable_cut_is_still_tokenized_in_bounded_pieces(smollm2, default_test_text):
    """A 200 kB base64-like blob (no spaces, no newlines) between two speeches: no call sees more than a
    few chunks, and the text around the blob keeps the ids of one call."""
    head, tail = default_test_text[:20_000], default_test_text[20_000:40_000]
    blob = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 6000
    counting = _Counting(smollm2)
    ids = token_ids(counting, head + blob + tail, chunk_chars=4096).tolist()
    assert max(counting.lengths) <= 5 * 4096 + 2 * CONTEXT_CHARS
    ref = _one_call(smollm2, head + blob + tail)
    n_head, n_tail = len(_one_call(smollm2, head)) - 5, len(_one_call(smollm2, tail)) - 5
    assert ids[:n_head] == ref[:n_head] and ids[-n_tail:] == ref[-n_tail:]  # realigned after the blob


def test_blank_text_is_refused():
    with pytest.raises(CorpusError, match="empty"):
        token_ids(None, " \n\t ")
