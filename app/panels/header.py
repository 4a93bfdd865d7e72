"""The page header: which model answers, and what it is good for (or why no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

import runtime

from .. import render as R
from . import Context

SAMPLE_QUESTION = "What is the access code for the misty lighthouse?"


def model_name(model_dir) -> str:
    """The model card's title ('# name' on its first line), else the folder's name."""
    card = Path(model_dir) / "MODEL_CARD.md"
    try:
        first = card.read_text(encoding="utf-8").lstrip().splitlines()[0]
        if first.startswith("# "):
            return first[2:].strip()[:80]
    except (OSError, IndexError, UnicodeDecodeError):
        pass
    return Path(model_dir).name


def describe_model(engine, settings) -> tuple[str, str]:
    """(one line about the model, a note on what it is good for)."""
    if engine is None:
        return f"Model folder: {settings.model_dir}", ""
    cfg = engine.config
    params = sum(p.numel() for p in engine.model.parameters())
    kinds = {runtime.SLIDING: "SWA", runtime.CSA: f"CSA {cfg.csa_rate}:1 top-{cfg.index_topk}",
             runtime.HCA: f"HCA {cfg.hca_rate}:1"}
    layers = " · ".join(kinds.get(t, t) for t in cfg.layer_types)
    limit, _ = engine.context_limit()
    dtype = str(engine.model.dtype).replace("torch.", "")
    line = (f"{model_name(settings.model_dir)} · {params / 1e6:.1f}M parameters · {cfg.num_hidden_layers} layers "
            f"[{layers}] · window {cfg.sliding_window} · context {limit:,} tokens · "
            f"{engine.model.device.type.upper()} {dtype}")
    if settings.is_shipped_model():
        note = ("This small model was trained here to find facts planted in long inputs: it is a retrieval "
                "demonstrator, not a chat assistant. Ask for something your files state (try the sample and "
                f"“{SAMPLE_QUESTION}”) and see which blocks its sparse attention picked.")
    else:
        note = "Answers stream from this model; the inspector shows which compressed blocks it attended to."
    return line, note


def build(ctx: Context) -> gr.HTML:
    line, note = describe_model(ctx.engine, ctx.settings)
    return gr.HTML(R.header(line, note, ctx.problem), elem_id="ll-header")


__all__ = ["SAMPLE_QUESTION", "build", "describe_model", "model_name"]
