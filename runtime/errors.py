"""Errors the runtime raises for requests it cannot serve, each with a stable `code`.

Messages say what happened and what to change in plain words (no API names), so they read well in
a terminal and on a page alike. Callers branch on `code` (and `remedy`, when the fix is an action
the caller offers), never on class names or message text:

    code                 raised when                                        remedy
    bad_request          a malformed request (empty question, bad params)   -
    context_too_large    a corpus (or snapshot) does not fit the limits      -
    conversation_full    a question does not fit what is left of the context new_conversation
    busy                 an answer is still streaming in this session       stop
    broken               the session failed mid-forward earlier              new_conversation
    cancelled            a prefill was stopped; the session holds no corpus  -
    nothing_to_undo      undo with no turn to take back                      -
    no_model             no model is loaded (app)                             -
    snapshot             a snapshot that cannot be used                      -
    corpus               unusable input files                                 -
    rank_failed          a model rank (torch.distributed) stopped answering   -

Pure: imports neither torch nor gradio.
"""

from __future__ import annotations

CODES = ("bad_request", "context_too_large", "conversation_full", "busy", "broken", "cancelled",
         "nothing_to_undo", "no_model", "snapshot", "corpus", "rank_failed")
REMEDIES = (None, "new_conversation", "stop")


class LonglensError(ValueError):
    """Base of the runtime's request errors: `code` (see CODES) and an optional `remedy` (REMEDIES)."""

    code = "bad_request"
    remedy: str | None = None

    def __init__(self, message: str, *, code: str | None = None, remedy: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if remedy is not None:
            self.remedy = remedy
        assert self.code in CODES and self.remedy in REMEDIES, (self.code, self.remedy)


class EngineError(LonglensError):
    """A request the engine cannot serve; the message says why and what to change."""


class ContextTooLarge(EngineError):
    """Does not fit: `tokens` asked for, `fits` the most that would."""

    code = "context_too_large"

    def __init__(self, message: str, tokens: int, fits: int, **kw):
        super().__init__(message, **kw)
        self.tokens, self.fits = tokens, fits


class Cancelled(EngineError):
    """A prefill stopped by Session.stop(); the session holds no corpus afterwards."""

    code = "cancelled"


class SnapshotError(LonglensError):
    """A snapshot that cannot be used; the message says why (other model/corpus, damaged, missing)."""

    code = "snapshot"


class CorpusError(LonglensError):
    """Input files that cannot be used; the message names the file and why."""

    code = "corpus"


__all__ = ["CODES", "REMEDIES", "Cancelled", "ContextTooLarge", "CorpusError", "EngineError", "LonglensError",
           "SnapshotError"]
