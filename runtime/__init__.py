"""Longlens runtime: a faithful, truly sparse DeepSeek-V4 in plain PyTorch.

Public API (used by the app, the CLI and outside checks):
- `load_model(path, device="cpu", dtype=torch.float32)` -> model from a folder with config.json + safetensors
- `model.new_cache(batch_size=1)` -> an empty per-sequence cache
- `model(input_ids, cache=None)` -> logits [B, S, vocab] (float), extending `cache` in place
"""

from .cache import Cache
from .config import ConfigError, ModelConfig
from .introspect import Capture, LayerRecord
from .model import Transformer, load_model

__all__ = ["Cache", "Capture", "ConfigError", "LayerRecord", "ModelConfig", "Transformer", "load_model"]
