"""Training examples for the default model, built from the shared item generators of runtime/tasks.py (the
planted formats, questions, values and the haystack pool; evaluation uses the same ones).

A training example is the evaluation's layout with more supervised answers per sequence: after the first
question, more questions about the same haystack follow as further user/assistant turns.

    <BOS><User>{haystack with planted items}\\n\\n{question}<Assistant>{answer}<EOS>[<User>{question}<Assistant>{answer}<EOS>]*

niah examples carry 1-8 needles (the others are distractors that share the attribute or the entity) and ask
about half of them or more (at most 6), one question per turn; kv examples plant one block of 4-16 pairs and
ask 2-6 of them; continue examples quote 1-4 snippets. Haystacks come from the ``train`` split.

Training-only copy drill (``add_recap``): some planted lines (or, for continue, random unique lines) are
repeated verbatim between the haystack and the first question; their values are extra copy targets. The
questions then ask only about items that were not repeated. Evaluation never uses it.

Every generator takes a ``random.Random`` and is deterministic given its state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from runtime.tasks import (ATTRIBUTES, CONTINUE_QUESTION, KINDS, KV_QUESTIONS, QA, VARIANTS, TokenPool,  # noqa: F401
                           char_span_to_tokens, entity, find_snippet, kv_block, make_value, niah_question,
                           niah_sentence, plant)

# --------------------------------------------------------------------------------------------- examples
@dataclass
class Example:
    kind: str
    haystack: str  # first user turn's context (with planted items), without the question
    qas: list[QA]
    ids: list[int] = field(default_factory=list)
    items: list[tuple[int, int]] = field(default_factory=list)  # char spans of every planted value
    recap: str = ""  # training only: lines of the haystack repeated before the question (see add_recap)
    copies: list[tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=list)  # (source, copy) chars
    copy_tokens: list[tuple[int, int, int, int]] = field(default_factory=list)  # filled by render
    no_recap: bool = False  # training only: keep the asked needle right before the question (make_example)

    @property
    def content(self) -> str:
        mid = self.recap + "\n\n" if self.recap else ""
        return self.haystack + "\n\n" + mid + self.qas[0].question


def _niah_items(rng: random.Random, variant: str, n: int, value_fmt: str | None = None, run_p: float = 0.0):
    """n distinct (attribute, entity, value); later ones share the attribute or entity with the first."""
    out, keys = [], set()
    attr0, ent0 = rng.choice(ATTRIBUTES), entity(rng, variant)
    while len(out) < n:
        r = rng.random()
        attr = attr0 if (out and r < 0.4) else rng.choice(ATTRIBUTES)
        ent = ent0 if (out and 0.4 <= r < 0.7) else entity(rng, variant)
        if not out:
            attr, ent = attr0, ent0
        if (attr, ent) in keys:
            continue
        keys.add((attr, ent))
        out.append((attr, ent, make_value(rng, variant, value_fmt, run_p)))
    return out


def _depths_for(rng: random.Random, n: int, edge_p: float = 0.0) -> list[float]:
    """Uniform needle depths; with ``edge_p`` > 0 that share goes to the very start or end of the haystack
    (a needle on the last line sits inside the question's sliding window, which uniform draws rarely hit at
    4k tokens). ``edge_p`` = 0 draws exactly as before, so earlier stages reproduce."""
    if not edge_p:
        return [rng.random() for _ in range(n)]
    return [rng.choice((0.0, 1.0)) if rng.random() < edge_p else rng.random() for _ in range(n)]


def _ntok(pool: TokenPool, texts: list[str]) -> int:
    return sum(len(pool.tok.encode(t)) + 1 for t in texts)


def make_example(kind: str, rng: random.Random, pool: TokenPool, n_tokens: int, variant: str = "train",
                 n_questions: int | None = None, max_needles: int = 8, value_fmt: str | None = None,
                 edge_p: float = 0.0, last_p: float = 0.0, run_p: float = 0.0) -> Example:
    """One training example of about ``n_tokens`` tokens in total (haystack sized to fit).

    niah ``last_p``: that share of examples puts the first asked needle on the haystack's last line, right
    before the question, and is marked ``no_recap`` (the layout of a depth-1.0 evaluation); 0 draws nothing.
    ``run_p``: numbers with a run of equal digits (make_value)."""
    if kind == "niah":
        n_needles = rng.randint(1, max_needles)
        items = _niah_items(rng, variant, n_needles, value_fmt, run_p)
        sents = [niah_sentence(*it) for it in items]
        nq = n_questions or rng.randint(max(1, n_needles // 2), min(6, n_needles))
        asked = rng.sample(range(n_needles), nq)
        overhead = _ntok(pool, [s for s, _ in sents]) + _ntok(
            pool, [niah_question(*items[i][:2]) + " " + items[i][2] for i in asked]) + 6 * nq + 8
        hay = pool.text(max(64, n_tokens - overhead), rng)
        depths = _depths_for(rng, n_needles, edge_p)
        last = bool(last_p) and rng.random() < last_p
        if last:
            depths[asked[0]] = 2.0  # sorts after any other needle drawn at 1.0; plant clamps it to the end
        text, spans = plant(hay, [(d, s) for d, (s, _) in zip(depths, sents)])
        qas = []
        for i in asked:
            attr, ent, val = items[i]
            vs = spans[i][0] + sents[i][1]
            qas.append(QA(niah_question(attr, ent), val, (vs, vs + len(val)), spans[i][0] / max(1, len(text)),
                          "niah"))
        return Example("niah", text, qas, items=[(spans[i][0] + sents[i][1],
                                                  spans[i][0] + sents[i][1] + len(items[i][2]))
                                                 for i in range(n_needles)], no_recap=last)
    if kind == "kv":
        n_pairs = rng.randint(4, 16)
        block, fmt, pairs = kv_block(rng, variant, n_pairs)
        nq = n_questions or rng.randint(2, 6)
        asked = rng.sample(range(n_pairs), min(nq, n_pairs))
        overhead = _ntok(pool, [block]) + _ntok(
            pool, [KV_QUESTIONS[fmt].format(key=pairs[i][0]) + " " + pairs[i][1] for i in asked]) + 6 * nq + 8
        hay = pool.text(max(64, n_tokens - overhead), rng)
        text, spans = plant(hay, [(rng.random(), block)])
        qas = []
        for i in asked:
            key, val, off = pairs[i]
            vs = spans[0][0] + off
            qas.append(QA(KV_QUESTIONS[fmt].format(key=key), val, (vs, vs + len(val)),
                          spans[0][0] / max(1, len(text)), "kv"))
        return Example("kv", text, qas, items=[(spans[0][0] + off, spans[0][0] + off + len(v))
                                               for _, v, off in pairs])
    if kind == "continue":
        nq = n_questions or rng.randint(1, 4)
        hay = pool.text(max(64, n_tokens - 40 * nq), rng)
        qas = []
        for _ in range(nq * 3):
            if len(qas) >= nq:
                break
            found = find_snippet(hay, rng, rng.random())
            if found is None:
                continue
            snip, cont, off = found
            if any(q.question == CONTINUE_QUESTION.format(snippet=snip) for q in qas):
                continue
            qas.append(QA(CONTINUE_QUESTION.format(snippet=snip), cont, (off, off + len(cont)),
                          off / max(1, len(hay)), "continue"))
        if not qas:  # no usable line (e.g. a dictionary chunk without long lines): fall back to a needle
            return make_example("niah", rng, pool, n_tokens, variant, n_questions, max_needles, value_fmt, edge_p,
                                last_p, run_p)
        return Example("continue", hay, qas)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def add_recap(ex: Example, rng: random.Random, max_lines: int = 8) -> Example:
    """Training-only copy drill: repeat some haystack lines verbatim between the haystack and the question.

    niah/kv: the lines holding planted values that are *not* asked about; the value inside each repeated line
    is a copy target (the line's start is the key). continue: random unique lines of >= 30 characters,
    everything after their first 12 characters is a copy target. Copy targets get the answer weight and the
    CSA supervision toward the source tokens' entries. The repeated lines sit right before the question, so
    the questions are only about items that are not repeated."""
    text = ex.haystack
    asked = {qa.value_chars for qa in ex.qas}
    lines = []
    if ex.kind in ("niah", "kv"):
        cand = [sp for sp in ex.items if sp not in asked]
        rng.shuffle(cand)
        for vs, ve in cand[:max_lines]:
            ls = text.rfind("\n", 0, vs) + 1
            le = text.find("\n", ve)
            le = len(text) if le < 0 else le
            lines.append((ls, le, vs - ls, ve - ls))
    else:
        busy = [qa.value_chars for qa in ex.qas]
        for _ in range(max_lines * 4):
            if len(lines) >= min(max_lines, 4):
                break
            pos = rng.randrange(len(text))
            ls = text.rfind("\n", 0, pos) + 1
            le = text.find("\n", pos)
            le = len(text) if le < 0 else le
            line = text[ls:le]
            if len(line) < 30 or not line.isprintable() or text.count(line) != 1:
                continue
            if any(ls <= b and a <= le for a, b in busy) or any(l[0] == ls for l in lines):
                continue
            lines.append((ls, le, 12, len(line)))
    if not lines:
        return ex
    parts, copies, off = [], [], len(text) + 2
    for ls, le, a, b in lines:
        parts.append(text[ls:le])
        copies.append(((ls + a, ls + b), (off + a, off + b)))
        off += le - ls + 1
    ex.recap = "\n".join(parts)
    ex.copies = copies
    return ex


# --------------------------------------------------------------------------------------------- rendering
def render(ex: Example, tokenizer, with_answers: bool = True) -> Example:
    """Fill ex.ids (render_chat layout) and every QA's token spans. Without answers, ids end with the
    first <Assistant> (the prompt an evaluator continues)."""
    msgs = [{"role": "user", "content": ex.content}]
    if with_answers:
        msgs.append({"role": "assistant", "content": ex.qas[0].answer})
        for qa in ex.qas[1:]:
            msgs += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
    ids = tokenizer.render_chat(msgs, add_generation_prompt=not with_answers)
    content_ids, offsets = tokenizer.encode_with_offsets(ex.content)
    base = 2  # BOS, User
    assert ids[base:base + len(content_ids)] == content_ids, "render_chat and encode disagree"
    for qa in ex.qas:
        qa.value_tokens = char_span_to_tokens(offsets, qa.value_chars, base)
    ex.copy_tokens = []
    for src, dst in ex.copies:
        a, b = char_span_to_tokens(offsets, src, base)
        c, d = char_span_to_tokens(offsets, dst, base)
        if b - a == d - c and ids[a:b] == ids[c:d]:  # identical tokens only
            ex.copy_tokens.append((a, b, c, d))
    if with_answers:  # walk the turns to find each answer's token span
        pos = base + len(content_ids)
        for i, qa in enumerate(ex.qas):
            if i > 0:
                pos += 1 + len(tokenizer.encode(qa.question))  # <User> question
            assert ids[pos] == tokenizer.assistant_id
            n = len(tokenizer.encode(qa.answer))
            qa.answer_tokens = (pos + 1, pos + 2 + n)  # answer tokens and EOS
            assert ids[pos + 1 + n] == tokenizer.eos_id
            pos += 2 + n
    ex.ids = ids
    return ex


__all__ = ["KINDS", "VARIANTS", "TokenPool", "Example", "QA", "make_example", "render", "plant", "find_snippet",
           "niah_sentence", "niah_question", "make_value", "add_recap", "KV_QUESTIONS", "CONTINUE_QUESTION",
           "ATTRIBUTES", "char_span_to_tokens"]
