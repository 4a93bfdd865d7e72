"""Tests for runtime/tokenizer.py and the shipped assets/tokenizer.json (plus the corpus split helpers)."""

from __future__ import annotations

import inspect
import json

import pytest
import tokenizers
from tokenizers import decoders, models

from runtime.tokenizer import ASSISTANT, BOS, DEFAULT_PATH, EOS, USER, StreamDecoder, Tokenizer
from runtime import haystacks as corpus_sources

SAMPLES = {
    "code": 'def foo_bar(x: int = 42) -> str:\n\t"""Doc."""\n    return f"{x!r:>10}"  # comment\n\n\n',
    "prose": "The quick brown fox jumps over the lazy dog. It's 3.14159 -- or so they say; "
             "\"quotes\", (parens) & ampersands!\n\nNew paragraph   with  odd   spacing.  ",
    "unicode": "naïve café — Ünïcödé: 日本語のテキスト, 中文, 한국어, עברית, العربية, Ελληνικά, "
               "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷, math ∑∫√∞, digits ٣٤٥ ४२, combining e\u0301, zero-width\u200bspace, \ufffd",
    "whitespace": " \n\n  \t\t  leading and trailing  \n ",
    "numbers": "pass key 48213, 0x7f3a, 1234567890, -0.5e-9, v1.2.3, 2024-06-01T12:00:00Z",
    "special_text": "a document that mentions <｜User｜> and <｜end▁of▁sentence｜> literally",
    "empty": "",
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(DEFAULT_PATH)


# --------------------------------------------------------------------------------------------- basics
def test_special_token_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.pad_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_token(i) for i in range(5)] == [BOS, EOS, USER, ASSISTANT, "<pad>"]
    assert tok.vocab_size == len(tok) == 8192
    assert tok.special_ids == frozenset(range(5))
    assert tok.is_byte_level


def test_shipped_config():
    cfg = json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))
    assert cfg["model"]["type"] == "BPE"
    assert cfg["normalizer"] is None and cfg["post_processor"] is None
    assert cfg["decoder"]["type"] == "ByteLevel"
    assert [t["content"] for t in cfg["added_tokens"]] == [BOS, EOS, USER, ASSISTANT, "<pad>"]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(tok, name):
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert ids == tok.encode_batch([text])[0]


def test_round_trip_real_source(tok):
    text = inspect.getsource(json.decoder)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(text.encode()) / len(ids) > 2.5  # compresses code reasonably


def test_no_bos_added_and_special_text_is_plain(tok):
    text = SAMPLES["special_text"]
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids  # literal marker text cannot inject special tokens
    parsed = tok.encode(text, allow_special=True)
    assert tok.user_id in parsed and tok.eos_id in parsed
    assert tok.decode(parsed) == text
    assert tok.decode(parsed, skip_special_tokens=True) == text.replace(USER, "").replace(EOS, "")
    assert tok.encode("hello")[0] != tok.bos_id


# --------------------------------------------------------------------------------------------- offsets
@pytest.mark.parametrize("name", ["code", "prose", "whitespace", "numbers"])
def test_offsets_ascii(tok, name):
    text = SAMPLES[name]
    assert text.isascii()
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(offsets) == len(ids)
    pos = 0
    for i, (s, e) in zip(ids, offsets):
        assert s == pos, "ASCII tokens tile the text without gaps"
        assert text[s:e] == tok.decode([i])
        pos = e
    assert pos == len(text)


def test_offsets_unicode(tok):
    text = SAMPLES["unicode"]
    ids, offsets = tok.encode_with_offsets(text)
    assert len(offsets) == len(ids)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    prev_end = 0
    for (s, e) in offsets:
        assert 0 <= s < e <= len(text)
        assert s <= prev_end  # contiguous, or sharing the span of a split multi-byte character
        prev_end = max(prev_end, e)
    # Tokens whose bytes form whole characters map exactly onto their span.
    for i, (s, e) in zip(ids, offsets):
        b = tok.token_bytes(i)
        try:
            piece = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert text[s:e] == piece


# --------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("text", ["emoji 😀🎉👩‍👩‍👧!", "中文和日本語のテキスト。", SAMPLES["unicode"], SAMPLES["code"]])
def test_stream_decoder_reconstructs(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.feed(i) for i in ids]
    tail = dec.flush()
    assert "".join(pieces) + tail == text
    assert tail == ""
    if text != SAMPLES["code"] and text != SAMPLES["unicode"]:
        assert "\ufffd" not in "".join(pieces)  # never a half character


def test_stream_decoder_holds_back_split_characters(tok):
    text = "😀🎉中"
    ids = tok.encode(text)
    partial = [i for i in ids if not _is_utf8(tok.token_bytes(i))]
    assert partial, "expected the tokenizer to split these characters over several tokens"
    dec = StreamDecoder(tok)
    out = []
    for i in ids:
        piece = dec.feed(i)
        assert "\ufffd" not in piece
        if piece:
            out.append(piece)
    assert "".join(out) == text
    assert len(out) < len(ids)  # something was held back
    # An unfinished character is flushed as U+FFFD, like decode() does.
    dec = tok.stream_decoder()
    first_partial = next(k for k, i in enumerate(ids) if not _is_utf8(tok.token_bytes(i)))
    got = "".join(dec.feed(i) for i in ids[: first_partial + 1]) + dec.flush()
    assert got == tok.decode(ids[: first_partial + 1])


def test_stream_decoder_special_tokens(tok):
    ids = tok.render_chat([{"role": "user", "content": "hé"}])
    dec = tok.stream_decoder()
    assert "".join(dec.feed_many(ids)) + dec.flush() == tok.decode(ids)
    dec = tok.stream_decoder(skip_special_tokens=True)
    assert "".join(dec.feed_many(ids)) + dec.flush() == "hé"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --------------------------------------------------------------------------------------------- chat
def test_render_chat_layout(tok):
    msgs = [{"role": "user", "content": "What is the pass key?"},
            {"role": "assistant", "content": "It is 48213."},
            {"role": "user", "content": "Thanks. 日本?"}]
    ids = tok.render_chat(msgs)
    e = tok.encode
    assert ids == ([tok.bos_id, tok.user_id] + e("What is the pass key?") + [tok.assistant_id]
                   + e("It is 48213.") + [tok.eos_id, tok.user_id] + e("Thanks. 日本?") + [tok.assistant_id])
    assert tok.decode(ids) == (f"{BOS}{USER}What is the pass key?{ASSISTANT}It is 48213.{EOS}"
                               f"{USER}Thanks. 日本?{ASSISTANT}")


def test_render_chat_variants(tok):
    e = tok.encode
    # system message goes right after BOS without a marker (DeepSeek style)
    ids = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert ids == [0] + e("Be brief.") + [2] + e("hi") + [3]
    # training layout: final assistant turn closed by EOS
    ids = tok.render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          add_generation_prompt=False)
    assert ids == [0, 2] + e("q") + [3] + e("a") + [1]
    # turn markers inside content stay plain text
    ids = tok.render_chat([{"role": "user", "content": f"x{ASSISTANT}y"}])
    assert ids.count(tok.assistant_id) == 1 and ids[-1] == tok.assistant_id
    with pytest.raises(ValueError):
        tok.render_chat([{"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError):
        tok.render_chat([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}])
    with pytest.raises(ValueError):
        tok.render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError):
        tok.render_chat([{"role": "user", "content": None}])


# --------------------------------------------------------------------------------------------- other tokenizers
def _foreign_tokenizer(specials: list[str]) -> tokenizers.Tokenizer:
    """A non-byte-level BPE with byte fallback (Llama style) whose special tokens sit at the END of the vocab,
    as in DeepSeek's tokenizer.json (ids are not 0..4)."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for c in "abcdefghijklmnopqrstuvwxyz ":
        vocab[c] = len(vocab)
    t = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    t.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    t.add_special_tokens(specials)
    return t


def test_foreign_tokenizer_lookup_by_content_and_fallback_stream():
    t = Tokenizer(_foreign_tokenizer(["<unk>", USER, ASSISTANT, BOS, EOS]))
    assert (t.bos_id, t.eos_id, t.user_id, t.assistant_id) == (286, 287, 284, 285)
    assert t.pad_id == t.eos_id  # no pad token -> EOS
    assert not t.is_byte_level
    text = "ab 😀 c 中"
    ids = t.encode(text)
    assert t.decode(ids) == text
    dec = t.stream_decoder()
    pieces = [dec.feed(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert t.render_chat([{"role": "user", "content": "ab"}]) == [286, 284] + t.encode("ab") + [285]


def test_missing_special_token_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    _foreign_tokenizer([BOS, EOS, ASSISTANT]).save(str(path))
    with pytest.raises(ValueError, match="<｜User｜>"):
        Tokenizer.from_file(path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_runtime_module_does_not_import_torch():
    import runtime.tokenizer as rt

    src = inspect.getsource(rt)
    assert "import torch" not in src and "from torch" not in src


# --------------------------------------------------------------------------------------------- corpus split
def test_split_is_deterministic_key_based_and_about_ten_percent():
    keys = [f"stdlib/pkg{i}/mod{i}.py" for i in range(5000)]
    splits = [corpus_sources.split_of(k) for k in keys]
    assert splits == [corpus_sources.split_of(k) for k in keys]
    frac = splits.count("heldout") / len(splits)
    assert 0.08 < frac < 0.12
    root = corpus_sources.stdlib_root()
    if root is not None:  # an absolute path maps onto the machine-independent key
        assert corpus_sources.corpus_key(root / "json" / "decoder.py") == "stdlib/json/decoder.py"
        assert corpus_sources.split_of(root / "json" / "decoder.py") == corpus_sources.split_of(
            "stdlib/json/decoder.py")
    assert corpus_sources.corpus_key("/usr/share/doc/python3.11/html/_sources/library/os.rst.txt") == \
        "pydoc/library/os.rst.txt"


def test_clean_text():
    raw = "ok\r\nline\rtab\tbell\x07nul\x00 c1\x85 é".encode() + b"\xff\xfe end"
    assert corpus_sources.clean_text(raw) == "ok\nline\ntab\tbellnul c1 é\ufffd\ufffd end"
