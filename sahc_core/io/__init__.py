"""Model and text access: lazy safetensors checkpoints, the component map, the embedded default model and corpus."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "source": ("ModelSource", "TensorInfo"),
    "components": ("Component", "TensorRole", "classify", "is_known_architecture", "tensor_table", "component_shares"),
    "default_model": ("default_model_dir", "DEFAULT_MODEL_NOTE"),
    "corpus": ("Corpus", "default_corpus", "load_corpus"),
    "rows": ("memory_bound", "read_stored", "iter_row_blocks"),
})
