"""Shared pytest fixtures: tiny sharded checkpoints built once per test session (offline, seeded).

Fixture directories are session-scoped and shared: tests must NOT modify them (copy with
``shutil.copytree(tiny_llama_dir, tmp_path / "m")`` first when a test needs to break a model).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import build_tiny_llama, build_tiny_qwen35  # noqa: E402


@pytest.fixture()
def cache_path(tmp_path, monkeypatch) -> Path:
    """``SAHC_CACHE`` pointed at ``tmp_path/cache/c.duckdb`` (not created) for the test (tests/test_hardening_*.py)."""
    p = tmp_path / "cache" / "c.duckdb"
    monkeypatch.setenv("SAHC_CACHE", str(p))
    return p


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer tied-embedding llama checkpoint saved in 2 safetensors shards (read-only use)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), shards=2)


@pytest.fixture(scope="session")
def tiny_qwen35_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen3.5 (1 linear + 1 full attention, vision tower, ``mtp.*`` shard) checkpoint."""
    return build_tiny_qwen35(tmp_path_factory.mktemp("tiny_qwen35"))


@pytest.fixture(scope="session")
def tiny_llama_tok_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama plus a word-level tokenizer trained on ``tiny_models.TINY_TEXT`` (read-only use)."""
    from tiny_models import with_word_tokenizer

    return with_word_tokenizer(tiny_llama_dir, tmp_path_factory.mktemp("llama_tok") / "m")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The embedded default model's directory (SmolLM2-135M from its Q4_1 GGUF; converted once)."""
    from sahc_core.io.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_llama_report(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(source, cache, report, progress calls)``: the report of the tiny llama, built once (read-only use)."""
    from sahc_core.cache import Cache
    from sahc_core.io.source import ModelSource
    from sahc_core.report.sections import build_report

    src = ModelSource.open(tiny_llama_dir)
    cache = Cache(tmp_path_factory.mktemp("tiny_report") / "c.duckdb")
    calls: list = []
    report = build_report(src, cache, device="cpu", progress=lambda d, t, w: calls.append((d, t, w)))
    return src, cache, report, calls


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Gemma 3 (sliding + full attention) with a SigLIP vision tower, hub naming (read-only use)."""
    from tiny_models import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 (Conv1D projections, tied head) checkpoint (read-only use)."""
    from tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_tok_dirs(tiny_qwen35_dir: Path, tiny_gemma3_dir: Path, tiny_gpt2_dir: Path, tiny_llama_tok_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"qwen3_5", "gemma3", "gpt2", "llama"}`` -> the tiny model plus the word-level tokenizer (read-only use)."""
    from tiny_models import with_word_tokenizer

    root = tmp_path_factory.mktemp("tok_models")
    dirs = {arch: with_word_tokenizer(d, root / arch)
            for arch, d in (("qwen3_5", tiny_qwen35_dir), ("gemma3", tiny_gemma3_dir), ("gpt2", tiny_gpt2_dir))}
    return {**dirs, "llama": tiny_llama_tok_dir}
