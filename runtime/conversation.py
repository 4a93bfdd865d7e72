"""A session's two halves of context: the corpus it was prefilled with, and the conversation after it.

Context layout of a session -- its cache holds exactly this token sequence:

    <BOS><User>[corpus]                            prefilled once (CorpusContext)
    {question 1}<Assistant>{answer 1}<EOS>         the first question continues the first user turn
    <User>{question 2}<Assistant>{answer 2}<EOS>   each later turn appends only its own tokens
    ...

where [corpus] is the Layout of runtime/corpus.py ("### File: {name}\\n" + text + "\\n\\n" per
document), so the corpus sits once inside the first user turn and the conversation follows
DeepSeek-V4's chat format (runtime/tokenizer.py). An answer's last token and its closing EOS are
`pending`: fed at the start of the next turn, so no forward pass is spent on a turn that never comes.

Nothing here runs the model: these are the bookkeeping objects the Session (runtime/session.py)
moves along with its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import CacheMark
from .corpus import Layout, Span
from .errors import EngineError


@dataclass
class CorpusContext:
    """The corpus part of a session's context: its layout and the cache state right after it."""
    layout: Layout | None
    offset: int  # context position of the layout's token 0 (after the chat preamble)
    mark: CacheMark  # the cache right after the corpus (what a new conversation rewinds to)
    logits: torch.Tensor | None = None  # [vocab] next-token logits at the mark

    @property
    def tokens(self) -> int:
        return self.mark.length

    def docs(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of each document in context positions (for runtime/figures.py)."""
        if self.layout is None:
            return []
        return [(d.name, d.token_start + self.offset, d.token_end + self.offset) for d in self.layout.documents]

    def locate(self, tok_start: int, tok_end: int) -> list[Span]:
        """File line spans of context tokens [tok_start, tok_end)."""
        return [] if self.layout is None else self.layout.locate(tok_start - self.offset, tok_end - self.offset)


@dataclass
class Turn:
    question: str
    answer: str
    answer_ids: list[int]
    stop_reason: str


@dataclass(frozen=True)
class TurnMark:
    """The session just before one turn: what undoing that turn returns to."""
    cache: CacheMark
    logits: torch.Tensor | None  # next-token logits at the mark
    ids: int  # len(Conversation.ids) then
    pending: tuple[int, ...]
    turns: int  # len(Conversation.turns) then


@dataclass
class Conversation:
    """The turns after the corpus: their token layout, text, and undo marks."""
    preamble: tuple[int, ...]  # <BOS><User>
    user_id: int
    assistant_id: int
    eos_id: int
    ids: list[int] = field(default_factory=list)  # tokens fed after the corpus
    pending: list[int] = field(default_factory=list)  # tokens of the last turn still to feed (its last token, EOS)
    turns: list[Turn] = field(default_factory=list)
    marks: list[TurnMark] = field(default_factory=list)  # one per turn answered in this process (undo)

    @classmethod
    def for_tokenizer(cls, tok) -> "Conversation":
        return cls((tok.bos_id, tok.user_id), tok.user_id, tok.assistant_id, tok.eos_id)

    def turn_ids(self, question_ids: list[int], context_tokens: int) -> list[int]:
        """The ids to feed for the next question, given how many tokens the context holds now."""
        if context_tokens == 0:
            head = list(self.preamble)  # no corpus: a plain chat
        elif not self.turns:
            head = []  # the first question continues the user turn holding the corpus
        else:
            head = self.pending + [self.user_id]
        return head + list(question_ids) + [self.assistant_id]

    def start(self, question: str, turn_ids: list[int], mark: TurnMark) -> Turn:
        """A turn whose prompt `turn_ids` is now in the cache; `mark` is the state before it."""
        self.marks.append(mark)
        self.ids += turn_ids
        self.pending = []
        turn = Turn(question, "", [], "closed")
        self.turns.append(turn)
        return turn

    def finish(self, turn: Turn, answer_ids: list[int], fed: int, text: str, stop_reason: str) -> None:
        """Record the answer: `fed` of its ids went into the cache, the rest (and EOS) are pending."""
        self.ids += answer_ids[:fed]
        self.pending = answer_ids[fed:] + [self.eos_id]
        turn.answer, turn.answer_ids, turn.stop_reason = text, list(answer_ids), stop_reason

    def mark(self, cache_mark: CacheMark, logits: torch.Tensor | None) -> TurnMark:
        return TurnMark(cache_mark, logits, len(self.ids), tuple(self.pending), len(self.turns))

    def can_undo(self) -> bool:
        return bool(self.marks)

    def undo(self) -> tuple[TurnMark, Turn]:
        """Take back the last turn; returns the mark to rewind the cache to and the removed turn."""
        if not self.marks:
            raise EngineError("no turn to undo" + (" (turns restored from a snapshot can only be cleared)"
                                                   if self.turns else ""), code="nothing_to_undo")
        m = self.marks.pop()
        removed = self.turns[m.turns]
        del self.turns[m.turns:]
        self.ids, self.pending = self.ids[:m.ids], list(m.pending)
        return m, removed

    def clear(self) -> None:
        self.ids, self.pending, self.turns, self.marks = [], [], [], []

    # ------------------------------------------------------------------------------------ snapshots
    def to_json(self) -> dict:
        return {"ids": self.ids, "pending": self.pending, "history": [vars(t) for t in self.turns]}

    def load_json(self, chat: dict) -> None:
        """Adopt a snapshot's chat.json (turns restored this way cannot be undone one by one).
        Raises ValueError on a malformed one."""
        try:
            turns = [Turn(**t) for t in chat.get("history", [])]
            ids, pending = [int(i) for i in chat["ids"]], [int(i) for i in chat.get("pending", [])]
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"chat.json: {e}") from None
        self.ids, self.pending, self.turns, self.marks = ids, pending, turns, []


__all__ = ["Conversation", "CorpusContext", "Turn", "TurnMark"]
