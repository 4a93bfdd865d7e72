"""Longlens runtime: a faithful, truly sparse DeepSeek-V4 in plain PyTorch.

Public API (used by the app, the CLI and outside checks):
- `load_model(path, device="cpu", dtype=torch.float32)` -> model from a folder with config.json + safetensors
- `model.new_cache(batch_size=1)` -> an empty per-sequence cache
- `model(input_ids, cache=None)` -> logits [B, S, vocab] (float), extending `cache` in place
"""

import importlib

# Names resolve lazily, so the pure modules (runtime.corpus, runtime.tokenizer, runtime.memory) import without torch.
_EXPORTS = {
    "Cache": "cache", "Capture": "introspect", "LayerRecord": "introspect", "ConfigError": "config",
    "ModelConfig": "config", "Transformer": "model", "load_model": "model",
    "Engine": "engine", "Session": "engine", "GenerationParams": "engine", "EngineError": "engine",
    "ContextTooLarge": "engine", "PrefillProgress": "engine", "Piece": "engine", "Answer": "engine",
    "Cancelled": "engine", "LoadReport": "engine", "Limits": "corpus", "ingest": "corpus", "CorpusError": "corpus",
    "Provenance": "provenance", "Source": "provenance", "SnapshotError": "snapshot", "list_snapshots": "snapshot",
    "mallopt": "memory", "trim_heap": "memory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
