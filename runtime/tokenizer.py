"""Thin wrapper over ``tokenizers.Tokenizer`` for Longlens (no torch import here).

Works with the shipped ``assets/tokenizer.json`` (byte-level BPE, vocab 8192, trained by train/tokenizer.py)
and with a real DeepSeek-V3/V4 ``tokenizer.json``: special tokens are looked up *by content*, never by a
fixed id. A tokenizer without ``<｜begin▁of▁sentence｜>``, ``<｜end▁of▁sentence｜>``, ``<｜User｜>`` or
``<｜Assistant｜>`` is rejected with a ``ValueError`` naming the missing ones.

Plain-text encoding (``encode``, ``encode_with_offsets``) never adds BOS/EOS and, by default, treats the
text of special tokens inside the input as ordinary text: a document containing the string
``<｜User｜>`` cannot inject a turn marker. Pass ``allow_special=True`` to parse them.

Chat layout (``render_chat``), DeepSeek-V4's layout without the ``<think>``/``</think>`` tags::

    <｜begin▁of▁sentence｜>[system]
    <｜User｜>{user 1}<｜Assistant｜>{answer 1}<｜end▁of▁sentence｜>
    ...
    <｜User｜>{question}<｜Assistant｜>                    (generation prompt; the model continues here)

(no newlines or spaces are inserted; shown on several lines for reading). An optional leading ``system``
message is placed right after BOS with no marker, as DeepSeek does. Each content is encoded separately as
plain text and the special tokens are inserted by id, so token boundaries never cross a turn marker.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders as _decoders

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD_CANDIDATES = ("<pad>", "<｜▁pad▁｜>")  # ours, DeepSeek-V3's

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte <-> printable-character table used by the ByteLevel pre-tokenizer/decoder."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """``Tokenizer.from_file(path)``; see the module docstring for the conventions."""

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "<memory>"):
        self._tok = tok  # parses special tokens in text
        self._plain = tokenizers.Tokenizer.from_str(tok.to_str())  # treats special-token text as text
        self._plain.encode_special_tokens = True
        self.source = source

        def find(content: str) -> int | None:
            return tok.token_to_id(content)

        required = {"bos": BOS, "eos": EOS, "user": USER, "assistant": ASSISTANT}
        ids = {name: find(content) for name, content in required.items()}
        missing = [required[n] for n, i in ids.items() if i is None]
        if missing:
            specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
            raise ValueError(
                f"{source}: tokenizer lacks the DeepSeek special token(s) {missing}; Longlens needs "
                f"{list(required.values())}. Special tokens it has: {specials[:20]}"
                + (" ..." if len(specials) > 20 else ""))
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.user_id: int = ids["user"]
        self.assistant_id: int = ids["assistant"]
        pad = next((i for i in (find(c) for c in PAD_CANDIDATES) if i is not None), None)
        self.pad_id: int = self.eos_id if pad is None else pad  # padded positions are masked anyway
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.is_byte_level: bool = isinstance(tok.decoder, _decoders.ByteLevel)
        self._byte_cache: dict[int, bytes] = {}

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(tokenizers.Tokenizer.from_file(path), source=path)

    @classmethod
    def default(cls) -> "Tokenizer":
        """The shipped tokenizer, assets/tokenizer.json."""
        return cls.from_file(DEFAULT_PATH)

    # ------------------------------------------------------------------------------------ encode/decode
    def _enc(self, allow_special: bool) -> tokenizers.Tokenizer:
        return self._tok if allow_special else self._plain

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added."""
        return self._enc(allow_special).encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str, allow_special: bool = False
                            ) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, offsets)``; ``offsets[i] = (start, end)`` are *character* offsets into ``text``.

        ``text[start:end]`` is the token's text. A byte-level token that holds only part of a multi-byte
        character is given the span of the whole character (so neighbouring tokens can share a span).
        """
        e = self._enc(allow_special).encode(text, add_special_tokens=False)
        return e.ids, [tuple(o) for o in e.offsets]

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        encs = self._enc(allow_special).encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Special tokens are kept as their text unless ``skip_special_tokens``."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw UTF-8 bytes a token stands for (byte-level tokenizers; else the decoded text's bytes)."""
        b = self._byte_cache.get(token_id)
        if b is not None:
            return b
        tok = self._tok.id_to_token(token_id)  # added tokens: their content
        if tok is None:
            raise ValueError(f"token id {token_id} out of range (vocab size {self.vocab_size})")
        if self.is_byte_level:  # same per-character rule as decoders.ByteLevel
            b = b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode("utf-8")
                         for c in tok)
        else:
            b = self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
        self._byte_cache[token_id] = b
        return b

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------ chat
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the DeepSeek-V4 layout without think tags (module docstring).

        ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; an optional system
        message first, then user and assistant turns alternating, starting with a user turn.
        ``add_generation_prompt=True`` requires the last message to be a user turn and ends the ids with
        ``<｜Assistant｜>``; with ``False`` a final assistant turn is closed by EOS (training layout) and a
        final user turn is left without ``<｜Assistant｜>``.
        """
        ids = [self.bos_id]
        msgs = list(messages)
        if msgs and msgs[0].get("role") == "system":
            ids += self.encode(_content(msgs[0], 0))
            msgs = msgs[1:]
        expected = "user"
        for i, m in enumerate(msgs):
            role = m.get("role")
            if role != expected:
                raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} "
                                 "(roles must alternate user/assistant after an optional leading system)")
            if role == "user":
                ids.append(self.user_id)
                ids += self.encode(_content(m, i))
                expected = "assistant"
            else:
                ids.append(self.assistant_id)
                ids += self.encode(_content(m, i))
                ids.append(self.eos_id)
                expected = "user"
        if add_generation_prompt:
            if expected != "assistant":
                raise ValueError("add_generation_prompt=True needs the last message to be a user turn")
            ids.append(self.assistant_id)
        return ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if not isinstance(c, str):
        raise ValueError(f"message {i}: content must be a string, got {type(c).__name__}")
    return c


class StreamDecoder:
    """Incremental detokenizer: ``feed(id)`` returns the newly completed text ('' while a multi-byte
    character is still incomplete), ``flush()`` returns what is left (incomplete bytes become U+FFFD).

    The concatenation of all pieces plus ``flush()`` equals ``tokenizer.decode(ids)``. Byte-level
    tokenizers are decoded exactly through an incremental UTF-8 decoder; other tokenizers use the
    prefix/read-offset method (hold back while the decoded tail ends in U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def feed(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tok.special_ids:
            return ""
        if self.tok.is_byte_level:
            return self._utf8.decode(self.tok.token_bytes(token_id))
        self._ids.append(token_id)
        prefix_text = self.tok.decode(self._ids[self._prefix:self._read])
        new_text = self.tok.decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""

    def feed_many(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty pieces for ``ids``."""
        for i in ids:
            piece = self.feed(i)
            if piece:
                yield piece

    def flush(self) -> str:
        if self.tok.is_byte_level:
            return self._utf8.decode(b"", final=True)
        if self._read < len(self._ids):
            prefix_text = self.tok.decode(self._ids[self._prefix:self._read])
            new_text = self.tok.decode(self._ids[self._prefix:])
            self._prefix = self._read = len(self._ids)
            return new_text[len(prefix_text):]
        return ""
