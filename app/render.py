"""HTML and text for the page: header, status and progress, documents, chips, source viewer.

Pure (no gradio, no torch). Everything that came from a user or the model is escaped here, once.
Clickable things carry `data-ll-open="<target>"` (or, inside chat messages, whose sanitizer drops
data- attributes, a class `ll-open-src-<turn>-<i>`); app/bridge.js turns a click on them into a
source-viewer request (targets are parsed by app/inspector_view.py: parse_target).
"""

from __future__ import annotations

from html import escape
from typing import Sequence

from runtime.figures import format_bytes


def _fmt_s(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


# ------------------------------------------------------------------------------------ header
def header(model_line: str, note: str, problem: str = "") -> str:
    body = f'<div class="ll-model">{escape(model_line)}</div>'
    if note:
        body += f'<div class="ll-note">{escape(note)}</div>'
    if problem:
        body += f'<div class="ll-status ll-error"><b>No model loaded.</b> {escape(problem)}</div>'
    return ('<div class="ll-header"><div class="ll-title"><span class="ll-logo">◉</span> Longlens'
            '<span class="ll-tagline">explore huge contexts through DeepSeek-V4\'s sparse attention</span></div>'
            f'{body}</div>')


# ------------------------------------------------------------------------------------ status
def status(kind: str, title: str, details: Sequence[str] = (), extra: str = "") -> str:
    """kind: info, ok, warn, error. `details` are escaped lines; `extra` is trusted HTML."""
    items = "".join(f"<li>{escape(d)}</li>" for d in details)
    return (f'<div class="ll-status ll-{kind}" role="status"><div class="ll-status-title">{escape(title)}</div>'
            + (f"<ul>{items}</ul>" if items else "") + extra + "</div>")


def progress(p, stage: str = "Prefilling") -> str:
    """A prefill progress bar from a runtime PrefillProgress."""
    frac = p.done / p.total if p.total else 0.0
    eta = _fmt_s(p.eta_s) if p.tokens_per_s > 0 else "…"
    return (f'<div class="ll-status ll-info" role="status"><div class="ll-status-title">{escape(stage)} '
            f'{p.done:,} / {p.total:,} tokens</div>'
            f'<div class="ll-bar"><div class="ll-bar-fill" style="width:{100 * frac:.1f}%"></div></div>'
            f'<div class="ll-bar-stats"><span>{frac:.0%}</span><span>{p.tokens_per_s:,.0f} tokens/s</span>'
            f'<span>ETA {eta}</span><span>elapsed {_fmt_s(p.elapsed_s)}</span></div></div>')


def starting(n_files: int) -> str:
    return status("info", f"Reading {n_files} file{'s' if n_files != 1 else ''}…",
                  ["Tokenizing; the prefill starts next (queued jobs wait for their turn)."])


def limits(max_file_bytes: int, max_files: int, context: tuple[int, str, int] | None, max_sessions: int) -> str:
    """The server's limits, always on the page. `context`: (tokens per session, why, kept for the chat)."""
    parts = [f"{format_bytes(max_file_bytes)} per file", f"{max_files:,} files per upload (archive members count)"]
    if context is not None:
        tokens, why, reserve = context
        parts.append(f"{tokens:,} tokens per session ({why}; {reserve:,} of them kept for the chat)")
    parts.append(f"{max_sessions:,} session{'s' if max_sessions != 1 else ''} kept in memory (beyond that the "
                 "least recently used idle one is saved to disk and reloads when its user returns)")
    return f'<div class="ll-muted ll-limits"><b>Limits</b>: {escape(" · ".join(parts))}</div>'


# ------------------------------------------------------------------------------------ corpus
def corpus_summary(n_docs: int, corpus_tokens: int, n_tokens: int, limit: int, why: str) -> str:
    if not n_docs:
        return '<div class="ll-muted">No corpus loaded yet: drop files above or try the sample.</div>'
    used = n_tokens / limit if limit else 0
    return (f'<div class="ll-summary"><b>{n_docs:,}</b> document{"s" if n_docs != 1 else ""} · '
            f'<b>{corpus_tokens:,}</b> corpus tokens · context {n_tokens:,} of {limit:,} '
            f'({used:.1%}; limit: {escape(why)})</div>')


def doc_table(rows: Sequence[tuple[str, int, float, int]], max_rows: int = 200) -> str:
    """Documents: name, tokens, share of the corpus (with a bar), cache bytes."""
    if not rows:
        return ""
    body = []
    for name, tokens, share, nbytes in rows[:max_rows]:
        body.append(f'<tr><td class="ll-doc-name"><span data-ll-open="file:{escape(name, quote=True)}:1" '
                    f'title="open {escape(name, quote=True)}">{escape(name)}</span></td>'
                    f'<td class="ll-num">{tokens:,}</td>'
                    f'<td class="ll-share"><div class="ll-minibar"><div style="width:{100 * share:.1f}%"></div>'
                    f'</div><span>{share:.1%}</span></td><td class="ll-num">{format_bytes(nbytes)}</td></tr>')
    more = len(rows) - max_rows
    if more > 0:
        body.append(f'<tr><td colspan="4" class="ll-muted">… and {more:,} more documents</td></tr>')
    return ('<table class="ll-docs"><thead><tr><th>document</th><th>tokens</th><th>share</th>'
            '<th>cache</th></tr></thead><tbody>' + "".join(body) + "</tbody></table>")


def skipped_lines(skipped, limit: int = 12) -> list[str]:
    out = [f"{s.name}: {s.reason}" for s in skipped[:limit]]
    if len(skipped) > limit:
        out.append(f"… and {len(skipped) - limit} more")
    return out


def snapshot_label(info) -> str:
    names = ", ".join(info.names[:3]) + (" …" if info.documents > 3 else "")
    chat = f" + {info.chat_tokens:,} chat tokens" if info.chat_tokens else ""
    return (f"{info.documents} doc{'s' if info.documents != 1 else ''} · {info.tokens:,} tokens{chat} · "
            f"{format_bytes(info.bytes)} · {names} · {info.created.replace('T', ' ').rstrip('Z')}")


# ------------------------------------------------------------------------------------ chat
def chip(target: str, label: str, weight: float | None = None, title: str = "") -> str:
    w = f'<span class="ll-chip-w">{weight:.0%}</span>' if weight is not None else ""
    return (f'<button class="ll-chip" data-ll-open="{escape(target, quote=True)}" '
            f'title="{escape(title or label, quote=True)}">{escape(label)}{w}</button>')


def source_label(src) -> str:
    lines = f"{src.line_start}" if src.line_end == src.line_start else f"{src.line_start}-{src.line_end}"
    return f"{src.file}:{lines}"


def chips(turn_index: int, sources: Sequence, top: int = 6) -> str:
    """The answer's top sources as clickable file:line chips."""
    if not sources:
        return ""
    items = "".join(chip(f"src:{turn_index}:{i}", source_label(s), s.weight, s.snippet)
                    for i, s in enumerate(sources[:top]))
    return f'<div class="ll-chips"><span class="ll-chips-label">Sources</span>{items}</div>'


STOP_TEXT = {"eos": "", "max_new_tokens": "stopped at the token limit", "stopped": "stopped",
             "context_full": "the context is full", "error": "failed"}


def answer_markdown(turn, index: int) -> str:
    """The assistant message: answer text, then a line of sources and stats (HTML in markdown)."""
    text = turn.answer if turn.answer.strip() else ("…" if not turn.stop_reason else "*(empty answer)*")
    parts = [text]
    meta = []
    why = STOP_TEXT.get(turn.stop_reason, turn.stop_reason)
    if why:
        meta.append(why)
    t = turn.timings
    if t.get("decode_tokens"):
        meta.append(f"{t['decode_tokens']} tokens · {t.get('decode_tokens_per_s', 0):.0f} tokens/s · "
                    f"first token {t.get('time_to_first_token_s', 0):.2f} s")
    if turn.sources:
        # the chat's sanitizer drops data- attributes: the target rides in a class (see bridge.js)
        srcs = " ".join(f'<span class="ll-chip ll-chip-sm ll-open-src-{index}-{i}">'
                        f"{escape(source_label(s))}</span>" for i, s in enumerate(turn.sources[:3]))
        parts.append(f'<div class="ll-msg-sources">sources: {srcs}</div>')
    if meta:
        parts.append(f'<div class="ll-msg-meta">{escape(" · ".join(meta))}</div>')
    if turn.note:
        parts.append(f'<div class="ll-msg-note">{escape(turn.note)}</div>')
    return "\n\n".join(parts)


def messages(turns: Sequence) -> list[dict]:
    """gradio 6 Chatbot messages for the turns."""
    out = []
    for i, t in enumerate(turns):
        out.append({"role": "user", "content": t.question})
        out.append({"role": "assistant", "content": answer_markdown(t, i)})
    return out


# ------------------------------------------------------------------------------------ source viewer
def source_view(view) -> str:
    """The document window of an inspector_view.SourceView, target lines marked, heat as background."""
    a, b = view.target
    rows = []
    for k, (line, h) in enumerate(zip(view.lines, view.heat)):
        no = view.first_line + k
        cls = "ll-line" + (" ll-target" if a <= no <= b else "")
        style = f' style="--heat:{h:.3f}"' if h > 0 else ""
        rows.append(f'<div class="{cls}"{style}><span class="ll-ln">{no}</span>'
                    f'<span class="ll-code">{escape(line) or " "}</span></div>')
    last = view.first_line + len(view.lines) - 1
    where = f"lines {view.first_line}–{last} of {view.total_lines}"
    cap = f" · {escape(view.caption)}" if view.caption else ""
    return (f'<div class="ll-viewer"><div class="ll-viewer-head"><b>{escape(view.name)}</b>'
            f'<span class="ll-muted"> · {where} · target {a}–{b}{cap}</span></div>'
            f'<div class="ll-viewer-body">{"".join(rows)}</div>'
            '<div class="ll-viewer-legend"><span class="ll-heat-key"></span> share of the selected '
            'attention · <span class="ll-target-key"></span> opened span</div></div>')


def placeholder(text: str) -> str:
    return f'<div class="ll-placeholder">{escape(text)}</div>'


__all__ = ["answer_markdown", "chip", "chips", "corpus_summary", "doc_table", "header", "messages", "placeholder",
           "progress", "skipped_lines", "snapshot_label", "source_label", "source_view", "starting", "status"]
