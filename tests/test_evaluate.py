"""Perplexity protocol and output cosine, against independent computations on a tiny llama."""
from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sahc_core.errors import CorpusError, ModelError
from sahc_core.evaluate.perplexity import PplConfig, _windows, perplexity
from sahc_core.evaluate.activations import attention_output_cosine, capture_block_io, capture_inputs
from sahc_core.evaluate.model import load_model
from sahc_core.metrics import output_cosine

TEXT = (
    "When shall we three meet again in thunder, lightning, or in rain? When the hurlyburly's done, "
    "when the battle's lost and won. That will be ere the set of sun. Where the place? Upon the heath. "
    "There to meet with Macbeth. Fair is foul, and foul is fair: hover through the fog and filthy air. "
) * 6


def _tiny_tokenizer(text: str, vocab_size: int = 200):
    """A BPE tokenizer trained in memory on ``text`` (offline), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama_tok") / "m"
    shutil.copytree(tiny_llama_dir, out)
    _tiny_tokenizer(TEXT).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    return load_model(model_dir, device="cpu")


def _ids(tokenizer, text: str = TEXT) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"])


def _reference_nll(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """HF-guide loop (labels= loss per window), with the exact count of predicted labels per window."""
    nll, count, prev_end, n = 0.0, 0, 0, ids.numel()
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        x = ids[begin:end].unsqueeze(0)
        y = x.clone()
        y[:, : -(end - prev_end)] = -100
        k = int((y[:, 1:] != -100).sum())  # labels the shifted loss actually scores
        if k:
            with torch.no_grad():
                nll += float(model(x, labels=y).loss) * k
            count += k
        prev_end = end
        if end == n:
            break
    return nll, count


def test_non_overlapping_matches_independent_loop(loaded) -> None:
    model, tok = loaded
    ids = _ids(tok)
    assert ids.numel() > 300
    res = perplexity(model, tok, TEXT, PplConfig(window=64, batch_size=3))
    nll, count = _reference_nll(model, ids, 64, 64)
    n_windows = math.ceil(ids.numel() / 64) - (ids.numel() % 64 == 1)
    assert res.tokens == count == ids.numel() - n_windows
    assert res.nll_sum == pytest.approx(nll, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert (res.window, res.stride, res.windows, res.text_tokens) == (64, 64, n_windows, ids.numel())
    assert res.dtype == "float32" and res.device == "cpu" and res.seconds > 0


def test_single_window_matches_numpy_log_softmax(loaded) -> None:
    model, tok = loaded
    ids = _ids(tok)[:100]
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0].double().numpy()
    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -logp[np.arange(99), ids[1:].numpy()].sum()
    res = perplexity(model, tok, TEXT, PplConfig(window=128, max_tokens=100))
    assert res.tokens == 99 and res.windows == 1
    assert res.nll_sum == pytest.approx(nll, rel=1e-6)


@pytest.mark.parametrize("window, stride", [(64, 16), (64, 48), (50, 7), (64, 64)])
def test_stride_matches_hf_guide_convention(loaded, window: int, stride: int) -> None:
    model, tok = loaded
    ids = _ids(tok)[:300]
    res = perplexity(model, tok, TEXT, PplConfig(window=window, stride=stride, max_tokens=300, batch_size=4))
    nll, count = _reference_nll(model, ids, window, stride)
    assert res.tokens == count
    if stride < window:
        assert count == 299  # every token but the first is scored exactly once
    assert res.nll_sum == pytest.approx(nll, rel=1e-6)


def test_stride_gives_more_context_lower_ppl(default_model) -> None:
    """On a trained model (the embedded SmolLM2) a sliding window, which gives every scored token at
    least window - stride tokens of context, has a lower perplexity than non-overlapping windows,
    whose first tokens see almost none; and it scores every token but the first."""
    from sahc_core.io.corpus import default_corpus

    model, tok = load_model(default_model, device="cpu")
    text = default_corpus().test_text[:6000]
    flat = perplexity(model, tok, text, PplConfig(window=16, max_tokens=160))
    sliding = perplexity(model, tok, text, PplConfig(window=16, stride=8, max_tokens=160))
    assert sliding.tokens == sliding.text_tokens - 1 and flat.tokens < sliding.tokens
    assert sliding.ppl < 0.9 * flat.ppl


@pytest.mark.parametrize("n, window, stride", [(10, 4, 4), (9, 4, 4), (300, 64, 16), (5, 8, 8), (65, 64, 64), (100, 7, 3)])
def test_windows_score_each_position_at_most_once(n: int, window: int, stride: int) -> None:
    spans = _windows(n, window, stride)
    scored = [p for b, e, first in spans for p in range(first, e)]
    assert len(scored) == len(set(scored)) and all(1 <= p < n for p in scored)
    assert all(e - b <= window and b < first for b, e, first in spans)
    if stride < window:
        assert sorted(scored) == list(range(1, n))
    else:  # non-overlapping: every window's first token is context only
        assert sorted(scored) == [p for p in range(1, n) if p % window]


def test_batching_and_max_tokens_are_exact(loaded) -> None:
    model, tok = loaded
    one = perplexity(model, tok, TEXT, PplConfig(window=40, batch_size=1, max_tokens=205))
    many = perplexity(model, tok, TEXT, PplConfig(window=40, batch_size=4, max_tokens=205))
    assert one.tokens == many.tokens == 205 - 6  # windows 40x5 + 5 -> 6 windows, 6 unscored starts
    assert one.text_tokens == 205
    assert many.nll_sum == pytest.approx(one.nll_sum, rel=1e-6)
    nll, count = _reference_nll(model, _ids(tok)[:205], 40, 40)
    assert count == one.tokens and one.nll_sum == pytest.approx(nll, rel=1e-6)
    assert (one.batch_size, many.batch_size) == (1, 4)


def test_logits_budget_shrinks_batches_not_numbers(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    import sahc_core.evaluate.perplexity as ev

    model, tok = loaded
    full = perplexity(model, tok, TEXT, PplConfig(window=40, batch_size=4))
    monkeypatch.setattr(ev, "LOGITS_BUDGET_BYTES", 2 * 40 * model.config.vocab_size * 4)  # two windows' logits
    capped = perplexity(model, tok, TEXT, PplConfig(window=40, batch_size=4))
    assert capped.batch_size == 2 and capped.tokens == full.tokens
    assert capped.nll_sum == pytest.approx(full.nll_sum, rel=1e-6)
    assert set(capped.to_dict()) >= {"ppl", "nll_sum", "tokens", "window", "stride", "dtype", "device", "seconds"}


def test_device_check() -> None:
    from sahc_core.evaluate.model import _same_device

    assert _same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert not _same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not _same_device(torch.device("cpu"), torch.device("cuda:0"))


def test_default_window_and_progress(loaded) -> None:
    model, tok = loaded
    seen: list[tuple[int, int]] = []
    res = perplexity(model, tok, TEXT, PplConfig(batch_size=2), progress=lambda d, t: seen.append((d, t)))
    assert res.window == model.config.max_position_embeddings == 128  # min(2048, max positions)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (res.tokens, res.tokens)


def test_bad_protocols(loaded) -> None:
    model, tok = loaded
    with pytest.raises(ValueError, match="exceeds"):
        perplexity(model, tok, TEXT, PplConfig(window=4096))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, TEXT, PplConfig(stride=4096))
    with pytest.raises(CorpusError):
        perplexity(model, tok, "   ", PplConfig())
    for bad in (dict(window=1), dict(window=8, stride=9), dict(max_tokens=1), dict(batch_size=0), dict(dtype="int8")):
        with pytest.raises(ValueError):
            PplConfig(**bad)


def test_load_model_with_state_dict(model_dir: Path, loaded) -> None:
    model, tok = loaded
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied alias left out
    sd["model.layers.0.mlp.down_proj.weight"] *= 0.5
    m2, _ = load_model(model_dir, device="cpu", state_dict=sd)
    assert not m2.training
    assert torch.equal(m2.model.layers[0].mlp.down_proj.weight, sd["model.layers.0.mlp.down_proj.weight"])
    assert perplexity(m2, tok, TEXT, PplConfig(window=64)).nll_sum != perplexity(model, tok, TEXT, PplConfig(window=64)).nll_sum
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ModelError, match="shape"):
        load_model(model_dir, device="cpu", state_dict=bad)
    with pytest.raises(ModelError, match="lacks"):
        load_model(model_dir, device="cpu", state_dict={k: v for k, v in sd.items() if k != "model.norm.weight"})
    with pytest.raises(ModelError, match="lacks"):
        load_model(model_dir, device="cpu", state_dict={"extra.weight": torch.ones(1), **sd})
    untied = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"] + 1})
    with pytest.raises(ModelError, match="tied"):
        load_model(model_dir, device="cpu", state_dict=untied)


def test_load_model_errors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(tiny_llama_dir, device="cpu")  # the fixture ships no tokenizer
    with pytest.raises(ValueError):
        load_model(tiny_llama_dir, dtype="int3")


def test_capture_inputs_are_the_real_activations(loaded) -> None:
    model, tok = loaded
    ids = _ids(tok)
    # q_proj of layer 0 sees input_layernorm(embedding): RMSNorm computed by hand
    X = capture_inputs(model, tok, TEXT, "model.layers.0.self_attn.q_proj.weight", n_tokens=200)
    emb = model.model.embed_tokens.weight.detach()[ids[:200]].double()
    w = model.model.layers[0].input_layernorm.weight.detach().double()
    expected = emb / torch.sqrt(emb.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * w
    assert X.shape == (200, 64) and X.dtype == torch.float32
    assert torch.allclose(X.double(), expected, atol=1e-5)
    # lm_head sees the final hidden states: X @ W^T are the model's logits (2 windows of 128)
    H = capture_inputs(model, tok, TEXT, "lm_head", n_tokens=200)
    with torch.no_grad():
        logits = torch.cat([model(ids[:128][None]).logits[0], model(ids[128:200][None]).logits[0]])
    assert torch.allclose(H @ model.lm_head.weight.detach().T, logits, atol=1e-4)
    with pytest.raises(ValueError, match="not a linear"):
        capture_inputs(model, tok, TEXT, "model.embed_tokens")
    with pytest.raises(ModelError, match="no module"):
        capture_inputs(model, tok, TEXT, "model.layers.9.mlp.up_proj")


@pytest.mark.parametrize("seed", [0, 1])
def test_output_cosine_matches_numpy(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(24, 16, generator=g)
    W_hat = W + 0.3 * torch.randn(24, 16, generator=g)
    X = torch.randn(50, 16, generator=g)
    Y, Yh = X.double().numpy() @ W.double().numpy().T, X.double().numpy() @ W_hat.double().numpy().T
    ref = np.mean(np.sum(Y * Yh, 1) / (np.linalg.norm(Y, axis=1) * np.linalg.norm(Yh, axis=1)))
    assert output_cosine(W, W_hat, X) == pytest.approx(ref, abs=1e-6)
    assert output_cosine(W, W, X) == pytest.approx(1.0, abs=1e-12)
    assert output_cosine(W, -W, X) == pytest.approx(-1.0, abs=1e-12)
    X0 = X.clone()
    X0[0] = 0  # both outputs zero on that row: counts as identical
    assert output_cosine(W, W, X0) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        output_cosine(W, W[:3], X)
    with pytest.raises(ValueError):
        output_cosine(W, W_hat, X[:, :5])


def _block_outputs(model, ids: torch.Tensor, block: str) -> torch.Tensor:
    """Output of ``block`` in a plain forward pass (an ordinary forward hook, no re-run)."""
    out: list[torch.Tensor] = []
    handle = model.get_submodule(block).register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(ids[None])
    handle.remove()
    return out[0].reshape(-1, out[0].shape[-1]).double()


@pytest.mark.parametrize("weight, block", [
    ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn"),
    ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn"),
    ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp"),
])
def test_attention_output_cosine_matches_modified_model(loaded, weight: str, block: str) -> None:
    model, tok = loaded
    ids = _ids(tok)[:100]
    W = model.get_parameter(weight).detach().clone()
    W_hat = W + 10 * W.std() * torch.randn(W.shape, generator=torch.Generator().manual_seed(3))
    cos = attention_output_cosine(model, tok, TEXT, weight, W_hat, n_tokens=100)
    assert torch.equal(model.get_parameter(weight), W)  # restored
    other = copy.deepcopy(model)
    other.get_parameter(weight).data = W_hat.clone()
    ref, new = _block_outputs(model, ids, block).numpy(), _block_outputs(other, ids, block).numpy()
    expected = np.mean(np.sum(ref * new, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1)))
    assert cos == pytest.approx(expected, abs=1e-5)
    assert -1.0 < cos < 0.999
    assert attention_output_cosine(model, tok, TEXT, weight, W, n_tokens=100) == pytest.approx(1.0, abs=1e-6)


def test_capture_block_io_windows_and_errors(loaded) -> None:
    model, tok = loaded
    calls = capture_block_io(model, tok, TEXT, "model.layers.0.self_attn", n_tokens=200)
    assert [c.output.shape[1] for c in calls] == [128, 72]
    assert "position_embeddings" in calls[0].kwargs
    W = model.lm_head.weight.detach()
    with pytest.raises(ValueError, match="shape"):
        attention_output_cosine(model, tok, TEXT, "model.layers.0.self_attn.q_proj.weight", W)
    with pytest.raises(ValueError, match="not inside a block"):
        attention_output_cosine(model, tok, TEXT, "lm_head.weight", W)


def test_reused_head_buffers_give_the_models_own_log_probs(loaded) -> None:
    """The decoder + buffered-head path is taken for llama and is bit-identical to model(x).logits."""
    from sahc_core.evaluate.perplexity import _LogProbs

    model, tok = loaded
    ids = _ids(tok)
    with torch.inference_mode():
        scorer = _LogProbs(model, ids[:16].unsqueeze(0))
        assert scorer.split is not None
        for x in (ids[:64].unsqueeze(0), torch.stack([ids[64:128], ids[128:192]]), ids[:40].unsqueeze(0)):
            ref = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), dim=-1)
            assert torch.equal(scorer(x), ref)
        assert scorer._logp.shape[0] == 128  # grown once for the batch of two, then reused


def test_head_side_changes_fall_back_to_the_model_logits(loaded) -> None:
    """A model whose logits are not lm_head(decoder(x)) (soft-capping, scaling...) is scored through
    model(x).logits: the probe sees the difference."""
    from sahc_core.evaluate.perplexity import _LogProbs

    model, tok = loaded
    ids = _ids(tok)
    capped = copy.deepcopy(model)
    capped.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", 3 * torch.tanh(out.logits)) or out)
    with torch.inference_mode():
        assert _LogProbs(capped, ids[:16].unsqueeze(0)).split is None
    res = perplexity(capped, tok, TEXT, PplConfig(window=64))
    nll = 0.0
    with torch.inference_mode():
        for begin in range(0, ids.numel(), 64):
            x = ids[begin:begin + 64].unsqueeze(0)
            logp = torch.log_softmax(capped(input_ids=x, use_cache=False).logits.float(), dim=-1)[0, :-1]
            nll -= logp.gather(-1, x[0, 1:, None]).double().sum().item()
    assert res.nll_sum == pytest.approx(nll, rel=1e-9)
    assert res.nll_sum != pytest.approx(perplexity(model, tok, TEXT, PplConfig(window=64)).nll_sum, rel=1e-3)


def test_freed_memory_is_retained_only_inside_the_opt_in_block(monkeypatch, loaded) -> None:
    """perplexity() never touches the allocator; retain_freed_memory() (the CLI's opt-in) keeps freed
    memory inside its block, then trims and leaves glibc's own adapted thresholds (never the 128 KiB start
    values), also after a failure."""
    import sahc_core.evaluate.allocator as al

    calls: list[tuple] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(al, "_glibc", lambda: FakeLibc())
    model, tok = loaded
    perplexity(model, tok, TEXT, PplConfig(window=64))
    assert calls == []  # the library call leaves the process's allocator alone
    with al.retain_freed_memory():
        perplexity(model, tok, TEXT, PplConfig(window=64))
    restore = [("trim", 0), ("mallopt", al._M_MMAP_THRESHOLD, 32 * 2**20), ("mallopt", al._M_TRIM_THRESHOLD, 64 * 2**20)]
    assert calls[:2] == [("mallopt", al._M_MMAP_THRESHOLD, 32 * 2**20), ("mallopt", al._M_TRIM_THRESHOLD, 2**30)]
    assert calls[2:] == restore
    calls.clear()
    with pytest.raises(RuntimeError), al.retain_freed_memory():
        raise RuntimeError("boom")
    assert calls[2:] == restore
    monkeypatch.setattr(al, "_glibc", lambda: None)  # musl / macOS: nothing to tune
    with al.retain_freed_memory():
        pass


def test_glibc_is_found_here() -> None:
    import platform

    from sahc_core.evaluate.allocator import _glibc

    assert (_glibc() is not None) == (platform.libc_ver()[0] == "glibc")
