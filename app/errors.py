"""What the page says about an error: a title, the message, and what the user can do next.

Errors carry a `code` (and sometimes a `remedy`): the runtime's (runtime/errors.py lists them) and
the app's own (`AppError` below: "input", "busy", "no_model"). The page branches on those only,
never on class names or message text. An error without a code is not one a request can cause (a
bug, out of memory, ...): the caller shows it as a failure.

Pure: no gradio, no torch, no runtime import.
"""

from __future__ import annotations

from dataclasses import dataclass

CLEAR_CHAT_HINT = "Press Clear chat to start a new conversation; your corpus stays loaded."
STOP_HINT = "Press Stop, or wait for the answer to finish."

# code -> (status title, status kind); anything else: the caller's fallback title, "error"
TITLES = {
    "input": ("These files cannot be used", "error"),
    "corpus": ("These files cannot be used", "error"),
    "context_too_large": ("The corpus does not fit the context", "error"),
    "conversation_full": ("The conversation is full", "warn"),
    "cancelled": ("Prefill stopped", "warn"),
    "busy": ("Busy", "warn"),
    "broken": ("This conversation cannot go on", "error"),
    "snapshot": ("This snapshot cannot be used", "error"),
    "no_model": ("No model is loaded", "error"),
    "nothing_to_undo": ("Nothing to retry", "warn"),
    "rank_failed": ("A GPU process of the model stopped; the app is shutting down", "error"),
}
# remedy -> the action the page offers for it
HINTS = {"new_conversation": CLEAR_CHAT_HINT, "stop": STOP_HINT}


class AppError(Exception):
    """An error of the app's own with a `code` (see TITLES) and an optional `remedy` (see HINTS)."""

    code = "input"
    remedy: str | None = None

    def __init__(self, message: str = "", *, code: str | None = None, remedy: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if remedy is not None:
            self.remedy = remedy


class InputError(AppError, ValueError):
    """A request the app cannot act on (an unusable upload, nothing to retry or to open); the
    message says which file or what, and why."""

    code = "input"


@dataclass(frozen=True)
class Explained:
    title: str
    kind: str  # a status kind: "warn" or "error"
    message: str
    hint: str  # "" when the page offers nothing particular

    def text(self) -> str:
        """The message and the hint, as one line (a chat note or a toast)."""
        return f"{self.message} {self.hint}".strip() if self.hint else self.message


def code_of(err: BaseException) -> str | None:
    """The error's code, or None for errors no request should cause."""
    code = getattr(err, "code", None)
    return code if isinstance(code, str) and code else None


def explain(err: BaseException, fallback: str = "Something went wrong") -> Explained:
    """Title, kind and hint for `err` from its code and remedy; `fallback` titles uncoded errors."""
    title, kind = TITLES.get(code_of(err) or "", (fallback, "error"))
    message = str(err).strip() or title
    return Explained(title, kind, message, HINTS.get(getattr(err, "remedy", None) or "", ""))


__all__ = ["AppError", "CLEAR_CHAT_HINT", "Explained", "HINTS", "InputError", "STOP_HINT", "TITLES", "code_of",
           "explain"]
