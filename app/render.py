"""HTML and text for the page: header, status and progress, documents, chips, source viewer, and the
inspector's answer tokens, coverage table and comparison.

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
def chip(target: str, label: str, weight: float | None = None, title: str = "", cls: str = "") -> str:
    w = f'<span class="ll-chip-w">{weight:.0%}</span>' if weight is not None else ""
    return (f'<button class="ll-chip{" " + cls if cls else ""}" data-ll-open="{escape(target, quote=True)}" '
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


# ------------------------------------------------------------------------------------ inspector: answer tokens
def token_text(text: str) -> str:
    """An answer token as its chip shows it: spaces and line breaks made visible, nothing empty."""
    if text == "":
        return "∅"
    return text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥")


def token_chips(tokens: Sequence[tuple[int, str]], focus=None) -> str:
    """The last answer's generated tokens, clickable (app/panels/inspector.py's TOKENS_JS): a click
    inspects one token, a shift-click the span from the last clicked one. `focus`: None (the whole
    answer), a token index or (first, last); its tokens are marked."""
    if not tokens:
        return ('<div class="ll-tokens ll-muted">The answer\'s tokens show here: click one to see what it '
                'selected, shift-click another to add up the span between.</div>')
    if focus is None:
        lo, hi = 0, -1
    elif isinstance(focus, tuple):
        lo, hi = focus
    else:
        lo = hi = focus
    whole = " ll-tok-on" if focus is None else ""
    items = [f'<button class="ll-tok ll-tok-all{whole}" data-ll-tok="all" title="the whole answer">'
             'whole answer</button>']
    for k, text in tokens:
        on = " ll-tok-on" if lo <= k <= hi else ""
        items.append(f'<button class="ll-tok{on}" data-ll-tok="{k}" title="#{k} {escape(repr(text), quote=True)}">'
                     f'{escape(token_text(text))}</button>')
    return ('<div class="ll-tokens"><span class="ll-chips-label">Answer tokens</span>' + "".join(items)
            + '<span class="ll-muted ll-tok-hint">click: one token · shift-click: the span</span></div>')


# ------------------------------------------------------------------------------------ inspector: coverage
def _bar(share: float) -> str:
    return (f'<div class="ll-minibar"><div style="width:{100 * max(0.0, min(1.0, share)):.1f}%"></div></div>'
            f'<span>{share:.1%}</span>')


def region_chip(region, short: bool = False) -> str:
    """A never-read region (analysis.Region) as a chip opening the viewer at its lines; `short`: lines
    only (in its document's row), else file:lines and its length."""
    title = f"never read: {region.name} lines {region.lines}, {region.tokens:,} tokens"
    if short:
        return chip(region.target, region.lines, None, title)
    return chip(region.target, f"{region.name}:{region.lines}", None, title) + \
        f'<span class="ll-region-n">{region.tokens:,} tok</span>'


def coverage_summary(cov, answers: int) -> str:
    """One line over a Coverage (app/analysis.py): answers counted, share of the corpus read."""
    if not cov.docs:
        return placeholder("Load a corpus and ask questions: this view shows which parts of it the answers read.")
    if not cov.answers:
        return placeholder("Ask a question: this view then shows which parts of the corpus its answers read, "
                           "and which they never did.")
    left = answers - cov.answers
    note = (f" ({left} other answer{'s' if left != 1 else ''} not recorded)" if left > 0 else "")
    return (f'<div class="ll-summary"><b>{cov.answers}</b> answer{"s" if cov.answers != 1 else ""}{escape(note)} '
            f'read <b>{cov.read:,}</b> of the corpus\'s <b>{cov.entries:,}</b> compressed entries '
            f'(<b>{cov.share:.1%}</b>; an entry is {cov.rate} tokens, read when any CSA layer picked it for any '
            'answer token).</div>')


def coverage_table(cov, max_rows: int = 200, regions: int = 3) -> str:
    """Per document: entries read (share), attention mass received (share of the corpus-bound mass),
    and its longest never-read regions as chips."""
    if not cov.docs or not cov.answers:
        return ""
    body = []
    for d in cov.docs[:max_rows]:
        chips_ = "".join(region_chip(r, short=True) for r in d.regions[:regions])
        more = len(d.regions) - regions
        if more > 0:
            chips_ += f'<span class="ll-muted">+{more} more</span>'
        if not d.regions:
            chips_ = '<span class="ll-muted">none</span>'
        body.append(f'<tr><td class="ll-doc-name"><span data-ll-open="file:{escape(d.name, quote=True)}:1" '
                    f'title="open {escape(d.name, quote=True)}">{escape(d.name)}</span></td>'
                    f'<td class="ll-num">{d.read:,} / {d.entries:,}</td>'
                    f'<td><div class="ll-share">{_bar(d.share)}</div></td>'
                    f'<td title="attention weight {d.mass:.3g}"><div class="ll-share">{_bar(d.mass_share)}</div></td>'
                    f'<td><div class="ll-regions">{chips_}</div></td></tr>')
    more = len(cov.docs) - max_rows
    if more > 0:
        body.append(f'<tr><td colspan="5" class="ll-muted">… and {more:,} more documents</td></tr>')
    longest = cov.regions(8)
    head = ""
    if longest:
        head = ('<div class="ll-chips ll-unread"><span class="ll-chips-label">Never read, longest first</span>'
                + "".join(region_chip(r) for r in longest) + "</div>")
    return (head + '<table class="ll-docs ll-coverage"><thead><tr><th>document</th><th>entries read</th>'
            '<th>share read</th><th>share of the attention</th><th>never read (lines)</th></tr></thead>'
            '<tbody>' + "".join(body) + "</tbody></table>")


# ------------------------------------------------------------------------------------ inspector: compare
def _num(x: float, fmt: str = ".2f") -> str:
    return "–" if x != x else format(x, fmt)  # nan: nothing to compare


def compare_summary(cmp, i: int, j: int, sources_a: Sequence, sources_b: Sequence, top: int = 5) -> str:
    """The overlap of two answers (an analysis.Comparison of turns i and j) and their top sources, side
    by side; a source both share is marked."""
    if cmp is None:
        return placeholder("Ask two questions, then pick two answers here to compare what they read.")
    pairs = [(x, y) for x, y in cmp.shared if x < top and y < top]
    both_a, both_b = {x for x, _ in pairs}, {y for _, y in pairs}

    def column(turn: int, sources: Sequence, shared: set) -> str:
        items = "".join(chip(f"src:{turn}:{k}", source_label(s), s.weight, s.snippet,
                             "ll-shared" if k in shared else "") for k, s in enumerate(sources[:top]))
        return (f'<div class="ll-cmp-col"><div class="ll-chips-label">answer {turn + 1}: top sources</div>'
                f'<div class="ll-chips">{items or "<span class=ll-muted>none</span>"}</div></div>')

    per_layer = " · ".join(f"L{l} {_num(cmp.jaccard[l])}" for l in cmp.layers)
    return (f'<div class="ll-cmp"><div class="ll-cmp-stats" id="ll-overlap">'
            f'<span>overlap of the picked entries (Jaccard) <b class="ll-overlap-value">{_num(cmp.overall)}</b></span>'
            f'<span>per layer: {escape(per_layer)}</span>'
            f'<span>attention in common <b>{_num(cmp.weighted, ".0%")}</b></span>'
            f'<span>top sources in common <b>{len(both_a)}</b> (marked)</span></div>'
            f'<div class="ll-cmp-cols">{column(i, sources_a, both_a)}{column(j, sources_b, both_b)}</div></div>')


__all__ = ["answer_markdown", "chip", "chips", "compare_summary", "corpus_summary", "coverage_summary",
           "coverage_table", "doc_table", "header", "messages", "placeholder", "progress", "region_chip",
           "skipped_lines", "snapshot_label", "source_label", "source_view", "starting", "status", "token_chips",
           "token_text"]
