"""Running one dashboard page file under AppTest with a chosen model and a cache in a temp dir."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def run_page(page: str, model_dir, monkeypatch, tmp_path, timeout: float = 120) -> AppTest:
    """Run ``app_pages/<page>.py`` once with ``model_path = model_dir`` and ``SAHC_CACHE`` in ``tmp_path``."""
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    monkeypatch.syspath_prepend(str(ROOT))  # pages import app_state from the repo root
    at = AppTest.from_file(str(ROOT / "app_pages" / f"{page}.py"), default_timeout=timeout)
    at.session_state["model_path"] = str(model_dir)
    return at.run()


# -- every widget exercised ---------------------------------------------------------------------------
def _walk(node):
    from streamlit.testing.v1.element_tree import Block

    if isinstance(node, Block):
        for child in node.children.values():
            yield from _walk(child)
    else:
        yield node


def widget_name(w) -> str:
    """A widget's identity for coverage: its key, else ``type:label`` (pages should give every widget a key)."""
    return w.key or f"{w.type}:{getattr(w, 'label', '?')}"


class WidgetCoverage:
    """Records every widget an AppTest run drew and every widget the test interacted with.

    Interactions are recorded by wrapping ``set_value`` (and ``upload``) of every AppTest widget class,
    which every interaction (``click``, ``select``, ``input``, ``check``, ``increment``, ...) goes through;
    widgets are seen by walking the element tree after each ``AppTest.run``.
    """

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}
        self.touched: set[str] = set()

    def observe(self, at) -> None:
        from streamlit.testing.v1.element_tree import Widget

        for node in _walk(at._tree):
            if isinstance(node, Widget):
                self.seen.setdefault(widget_name(node), node.type)

    def missing(self) -> list[str]:
        """Widgets drawn at some point but never interacted with."""
        return sorted(set(self.seen) - self.touched)


def install_widget_coverage(monkeypatch) -> WidgetCoverage:
    """Patch AppTest so a :class:`WidgetCoverage` sees every run and every interaction (undone after the test)."""
    from streamlit.testing.v1 import element_tree as et

    cov = WidgetCoverage()
    classes = {c for c in vars(et).values() if isinstance(c, type) and issubclass(c, et.Widget)}
    for cls in classes:
        for meth in ("set_value", "upload"):
            if meth in vars(cls):
                orig = vars(cls)[meth]

                def wrapped(self, *a, __orig=orig, **kw):
                    cov.touched.add(widget_name(self))
                    return __orig(self, *a, **kw)
                monkeypatch.setattr(cls, meth, wrapped)
    orig_run = AppTest.run

    def run(self, *a, **kw):
        out = orig_run(self, *a, **kw)
        cov.observe(self)
        return out
    monkeypatch.setattr(AppTest, "run", run)
    return cov
