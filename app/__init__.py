"""Longlens Gradio app: UI, figures and glue to the runtime.

`Settings` and `build_demo` resolve lazily, so `import app.inspector_view` (pure) pulls in neither
gradio nor torch.
"""

import importlib

_EXPORTS = {"Settings": "settings", "build_demo": "ui"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'app' has no attribute {name!r}")
