"""Train the Longlens byte-level BPE tokenizer (vocab 8192) and write assets/tokenizer.json.

    .venv/bin/python train/tokenizer.py                 # train on ~30 MB of the train split, then measure
    .venv/bin/python train/tokenizer.py --measure-only  # bytes/token of the shipped tokenizer on held-out data

Design (DeepSeek-V3/V4 style, scaled down):
  * model: ``models.BPE`` without unk token; every byte is in the initial alphabet, so any text encodes.
  * pre-tokenizer: ``Split(\\p{N}, isolated)`` (numbers cut into single digits, as LLaMA does; DeepSeek's cut
    runs of up to 3: see train/DATA.md for why) followed by ``ByteLevel(add_prefix_space=False, use_regex=True)``
    (GPT-2 regex). No normalizer: ``decode(encode(text)) == text`` exactly.
  * decoder: ``decoders.ByteLevel``; no post-processor (BOS is added explicitly by runtime/tokenizer.py).
  * special tokens, ids fixed 0..4: ``<｜begin▁of▁sentence｜>``, ``<｜end▁of▁sentence｜>``, ``<｜User｜>``,
    ``<｜Assistant｜>``, ``<pad>``.
  * trainer: ``BpeTrainer(vocab_size=8192, min_frequency=2, initial_alphabet=ByteLevel.alphabet())``.

The corpus (runtime/haystacks.py) is read in a fixed, hash-based order with the sources interleaved by bytes,
and BPE training has no randomness, so the same machine contents give the same tokenizer.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # shared 2-core machine; must be set before tokenizers loads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime import haystacks  # noqa: E402

DEFAULT_OUT = REPO / "assets" / "tokenizer.json"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<pad>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, PAD]  # ids 0..4, in this order

VOCAB_SIZE = 8192
TRAIN_BYTES = 30_000_000


def build_untrained() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    return tok


def train(max_bytes: int = TRAIN_BYTES, vocab_size: int = VOCAB_SIZE, out: Path = DEFAULT_OUT,
          sources=haystacks.SOURCES) -> Tokenizer:
    tok = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    stats = {"docs": 0, "bytes": 0}
    per_source: dict[str, int] = {}

    def texts():
        for doc, text in haystacks.iter_documents("train", max_bytes, sources):
            n = len(text.encode("utf-8"))
            stats["docs"] += 1
            stats["bytes"] += n
            per_source[doc.source] = per_source.get(doc.source, 0) + n
            yield text

    t0 = time.time()
    tok.train_from_iterator(texts(), trainer=trainer)
    dt = time.time() - t0
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out), pretty=False)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"trained on {stats['docs']} docs, {stats['bytes'] / 1e6:.1f} MB "
          f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in per_source.items())}) in {dt:.1f} s")
    print(f"vocab {tok.get_vocab_size()} -> {out} ({out.stat().st_size / 1e3:.0f} kB, sha256 {digest[:16]})")
    return tok


def measure(path: Path = DEFAULT_OUT, split: str = "heldout", max_bytes: int | None = None,
            chunk_chars: int = 100_000) -> dict:
    """Bytes per token of ``split`` overall and per source (documents encoded in ~100k-char chunks)."""
    tok = Tokenizer.from_file(str(path))
    per: dict[str, list[int]] = {}
    batch: list[str] = []
    batch_src: list[str] = []

    def flush():
        encs = tok.encode_batch_fast(batch, add_special_tokens=False)
        for s, text, e in zip(batch_src, batch, encs):
            acc = per.setdefault(s, [0, 0, 0])
            acc[0] += len(text.encode("utf-8"))
            acc[1] += len(e.ids)
        batch.clear()
        batch_src.clear()

    for doc, text in haystacks.iter_documents(split, max_bytes):
        per.setdefault(doc.source, [0, 0, 0])[2] += 1
        for i in range(0, len(text), chunk_chars):
            batch.append(text[i:i + chunk_chars])
            batch_src.append(doc.source)
        if len(batch) >= 32:
            flush()
    if batch:
        flush()
    res = {s: {"docs": v[2], "bytes": v[0], "tokens": v[1], "bytes_per_token": round(v[0] / max(v[1], 1), 3)}
           for s, v in per.items()}
    tb = sum(v[0] for v in per.values())
    tt = sum(v[1] for v in per.values())
    res["all"] = {"docs": sum(v[2] for v in per.values()), "bytes": tb, "tokens": tt,
                  "bytes_per_token": round(tb / max(tt, 1), 3)}
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--max-bytes", type=int, default=TRAIN_BYTES)
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--measure-only", action="store_true")
    ap.add_argument("--no-measure", action="store_true")
    args = ap.parse_args(argv)
    if not args.measure_only:
        train(args.max_bytes, args.vocab_size, args.out)
    if not args.no_measure:
        t0 = time.time()
        res = measure(args.out)
        print(f"held-out bytes/token ({time.time() - t0:.1f} s):")
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
