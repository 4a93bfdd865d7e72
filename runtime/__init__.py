"""Longlens runtime: a faithful, truly sparse DeepSeek-V4 in plain PyTorch.

Public API (used by the app, the CLI and outside checks):
- `load_model(path, device="cpu", dtype=torch.float32)` -> model from a folder with config.json + safetensors
- `model.new_cache(batch_size=1)` -> an empty per-sequence cache
- `model(input_ids, cache=None)` -> logits [B, S, vocab] (float), extending `cache` in place
- `prefill`, `Generation`, `generate`, `decode_one_token`, `sample_next` (runtime/generate.py): the one
  generation core, token ids in and out
- `Engine` / `Session`: chat sessions over a prefilled corpus (runtime/engine.py, runtime/session.py)
- errors carry a `code` (runtime/errors.py)
- `figures`: the pure plotly figures (`from runtime import figures`)
- `isa`: the CPU's ISA and the indexer-key dtype chosen for it and the device (`isa.resolve("auto", device)`)
"""

import importlib

# Names resolve lazily, so the pure modules (runtime.corpus, runtime.tokenizer, runtime.memory) import without torch.
_EXPORTS = {
    "Cache": "cache", "CacheMark": "cache", "Capture": "introspect", "LayerRecord": "introspect",
    "ConfigError": "config", "ModelConfig": "config", "SLIDING": "config", "CSA": "config", "HCA": "config",
    "SHORT": "config", "Transformer": "model", "load_model": "model",
    "Engine": "engine", "Budget": "budget", "Session": "session", "PrefillProgress": "session", "Piece": "session",
    "Answer": "session", "LoadReport": "session", "Conversation": "conversation", "CorpusContext": "conversation",
    "Turn": "conversation", "GenerationParams": "generate", "Generation": "generate", "generate": "generate",
    "prefill": "generate", "decode_one_token": "generate", "sample_next": "generate",
    "LonglensError": "errors", "EngineError": "errors", "ContextTooLarge": "errors", "Cancelled": "errors",
    "CorpusError": "errors", "SnapshotError": "errors", "Limits": "corpus", "ingest": "corpus", "Corpus": "corpus", "Document": "corpus",
    "Provenance": "provenance", "Source": "provenance", "list_snapshots": "snapshot",
    "mallopt": "memory", "trim_heap": "memory",
    "Steering": "steering", "Steered": "steering", "SelectionDiff": "steering", "SpanWeight": "steering",
    "LayerMass": "steering", "Counterfactual": "session",
    "Trace": "trace", "TraceError": "trace", "from_sglang": "trace", "to_sglang": "trace", "read_trace": "trace",
    "write_trace": "trace", "session_info": "trace", "write_report": "report", "read_report": "report", "write_figures": "report",
    "report_html": "report", "SCOPE_NOTE": "steering", "report_figures": "report", "figure_image": "report", "ExportError": "report",
    "follow_if_follower": "cluster", "lead_if_distributed": "cluster", "RankFailed": "cluster",
    "needle_grid": "probe", "plant_needles": "probe", "Needle": "probe", "NeedleCell": "probe",
    "NeedleGrid": "probe", "ProbeProgress": "probe",
}
# Modules that are API as a whole: `from runtime import figures` (pure plotly, shared by the app and reports);
# `from runtime import isa` (the CPU / device and the indexer-key dtype chosen for it).
MODULES = ("figures", "isa")
__all__ = sorted(_EXPORTS) + list(MODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
