"""Security defaults, checked on the source tree: no remote code, no unpickling, localhost only.

The checks parse every Python file of the project with ``ast`` (stricter than a text grep: a
``trust_remote_code`` keyword is flagged unless it is literally ``False``, and ``torch.load`` must
pass ``weights_only=True`` literally). Each checker is first run on a small bad snippet, so a
checker that silently finds nothing would fail its own test.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SKIP_DIRS = {".venv", ".git", "cache", "test-artifacts", "__pycache__", ".pytest_cache", "node_modules"}
_UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
               ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
               ("cloudpickle", "load"), ("cloudpickle", "loads"), ("shelve", "open")}


def _python_files() -> list[Path]:
    out = []
    for p in REPO.rglob("*.py"):
        if not any(part in _SKIP_DIRS for part in p.relative_to(REPO).parts):
            out.append(p)
    return sorted(out)


def _dotted(node: ast.AST) -> tuple[str, ...]:
    """``a.b.c`` -> ("a", "b", "c"); anything else -> ()."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return tuple(reversed(parts))
    return ()


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe call in ``source``, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            name = _dotted(node.func)
            if "trust_remote_code" in kw and not _is_const(kw["trust_remote_code"], False):
                found.append(f"{filename}:{node.lineno}: trust_remote_code not literally False")
            if name[-2:] == ("torch", "load") and not _is_const(kw.get("weights_only"), True):
                found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
            if name[-2:] in _UNPICKLERS:
                found.append(f"{filename}:{node.lineno}: unpickling call {'.'.join(name)}")
            if name[-2:] in {("np", "load"), ("numpy", "load")} and not _is_const(kw.get("allow_pickle"), False) \
                    and "allow_pickle" in kw:
                found.append(f"{filename}:{node.lineno}: numpy.load with allow_pickle")
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "dill", "cloudpickle"}:
            found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
    return found


@pytest.mark.parametrize("snippet", [
    "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "AutoTokenizer.from_pretrained(p, trust_remote_code=flag)",
    "torch.load(f)",
    "torch.load(f, weights_only=False)",
    "import pickle\npickle.load(open(f, 'rb'))",
    "pickle.loads(b)",
    "pd.read_pickle(f)",
    "from pickle import load",
    "np.load(f, allow_pickle=True)",
])
def test_checker_flags_unsafe_snippets(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "AutoModel.from_pretrained(p, trust_remote_code=False)",
    "AutoModel.from_pretrained(p)",
    "torch.load(f, weights_only=True, map_location='cpu')",
    "safetensors.torch.load_file(f)",
    "json.load(f)",
])
def test_checker_accepts_safe_snippets(snippet):
    assert violations(snippet) == []


def test_project_has_python_files_to_check():
    files = {p.relative_to(REPO).as_posix() for p in _python_files()}
    assert {"app.py", "sahc_core/io/source.py", "sahc_core/cli/main.py"} <= files


def test_no_remote_code_no_pickle_in_code_base():
    found = []
    for p in _python_files():
        if p.resolve() == Path(__file__).resolve():
            continue  # this file names the unsafe calls in its snippets
        found += violations(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))
    assert found == [], "\n".join(found)


def test_streamlit_server_binds_localhost():
    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert cfg["server"]["address"] in {"localhost", "127.0.0.1"}
    assert cfg.get("browser", {}).get("gatherUsageStats") is False
    # a traceback would show file paths and code to whoever opens the page
    assert cfg.get("client", {}).get("showErrorDetails") in {"none", False}


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_only_checkpoints_are_refused_without_being_opened(suffix, tmp_path, monkeypatch):
    """A directory holding only a pickle checkpoint is refused, and the file is never unpickled."""
    import pickle

    from sahc_core.errors import ModelError
    from sahc_core.io.source import ModelSource

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / f"weights{suffix}").write_bytes(b"\x80\x04not a pickle")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    with pytest.raises(ModelError, match="pickle checkpoints .* refused"):
        ModelSource.open(tmp_path)


def model_loads_without_safetensors_only(source: str, filename: str = "<snippet>") -> list[str]:
    """``AutoModel*.from_pretrained`` calls that do not pass ``use_safetensors=True`` literally
    (a GGUF load, which names ``gguf_file``, reads no pickle either)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if len(name) >= 2 and name[-1] == "from_pretrained" and name[-2].startswith("AutoModel") \
                    and not _is_const(kw.get("use_safetensors"), True) and "gguf_file" not in kw:
                found.append(f"{filename}:{node.lineno}: {'.'.join(name)} without use_safetensors=True")
    return found


def test_model_loads_are_safetensors_only():
    """No silent fallback to unpickling pytorch_model.bin when a directory has no model.safetensors: every
    model load of the library and the app (not tests or bench scripts, which load their own fixtures)."""
    assert model_loads_without_safetensors_only("AutoModelForCausalLM.from_pretrained(p, dtype=d)")
    assert not model_loads_without_safetensors_only("AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)")
    found = []
    for p in _python_files():
        rel = p.relative_to(REPO)
        if rel.parts[0] in ("sahc_core", "app_pages") or rel.name.startswith("app"):
            found += model_loads_without_safetensors_only(p.read_text(encoding="utf-8"), str(rel))
    assert found == [], "\n".join(found)
