"""Evaluation: model loading, the perplexity protocol, real activations, the smoke test (metrics: ``sahc_core.metrics``)."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "model": ("load_model", "load_state", "load_tokenizer"),
    "names": ("NameMap", "build_name_map", "empty_model", "name_map_for"),
    "weights": ("AssembledWeights", "CheckpointWeights"),
    "offload": ("LayerLoader", "decide_offload", "perplexity_layerwise"),
    "evaluator": ("Evaluator",),
    "perplexity": ("PplConfig", "PplResult", "perplexity"),
    "activations": ("capture_inputs", "capture_block_io", "attention_output_cosine"),
    "layerwise": ("run_layerwise", "capture_layer_inputs", "decoder_layers", "LayerTurn"),
    "smoke": ("layer_output_cosines",),
    "allocator": ("retain_freed_memory",),
})
