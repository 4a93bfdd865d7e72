"""`python -m runtime`: the ask --json schema, exit status 2 + {"error"} for bad input, snapshot commands."""

import importlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import write_corpus

from runtime.__main__ import main

REPO = Path(__file__).resolve().parent.parent
SOURCE_KEYS = {"file", "line_start", "line_end", "weight", "layers", "snippet"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a corpus given three ways: a file, a folder and a zip archive (relative paths)."""
    root = tmp_path_factory.mktemp("cli")
    write_corpus(root / "docs")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("inner/notes.md", "# Notes\n\nthe archive member text\nsecond line\n")
    (root / "bundle.zip").write_bytes(buf.getvalue())
    (root / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (root / "bad.zip").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    return root


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_ask_json_schema_subprocess(tiny_model_dir, work):
    argv = [sys.executable, "-m", "runtime", "ask", "--corpus", "docs/a.txt", "docs", "bundle.zip",
            "--question", "What is the secret launch code?", "--model", str(tiny_model_dir), "--max-new-tokens", "3",
            "--chunk-size", "512", "--json"]
    p = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and len(p.stdout.strip().splitlines()) == 1
    out = json.loads(p.stdout)
    assert set(out) == {"answer", "sources", "timings", "cache_bytes", "dense_cache_bytes"}
    assert isinstance(out["answer"], str) and out["sources"]
    names = {"docs/a.txt", "docs/b.txt", "docs/c.md", "bundle.zip/inner/notes.md"}
    for s in out["sources"]:
        assert set(s) == SOURCE_KEYS and s["file"] in names
        assert isinstance(s["line_start"], int) and 1 <= s["line_start"] <= s["line_end"]
        assert isinstance(s["weight"], float) and 0 < s["weight"] <= 1
        assert s["layers"] and all(isinstance(l, int) for l in s["layers"]) and isinstance(s["snippet"], str)
    assert [s["weight"] for s in out["sources"]] == sorted((s["weight"] for s in out["sources"]), reverse=True)
    t = out["timings"]
    assert t["corpus_source"] == "prefill" and t["corpus_prefill_tokens"] == t["corpus_tokens"] > 500
    assert 0 < t["prefill_tokens"] < 20 and t["decode_tokens"] >= 1 and t["decode_tokens_per_s"] > 0
    assert set(t["layer_s"]) == {"sliding", "csa", "hca", "moe"}
    assert out["cache_bytes"]["total"] == sum(v for k, v in out["cache_bytes"].items() if k != "total")
    assert isinstance(out["dense_cache_bytes"], int) and out["dense_cache_bytes"] > out["cache_bytes"]["total"]


def test_ask_reuses_a_snapshot_and_prints_text(capsys, tiny_model_dir, work, tmp_path):
    common = ["ask", "--corpus", work / "docs", "--question", "Where?", "--model", tiny_model_dir,
              "--max-new-tokens", "2", "--snapshot-dir", tmp_path]
    code, out, _ = run_cli(capsys, *common, "--json")
    assert code == 0 and json.loads(out)["timings"]["corpus_source"] == "prefill"
    code, out, _ = run_cli(capsys, *common, "--json")
    t = json.loads(out)["timings"]
    assert code == 0 and t["corpus_source"] == "snapshot" and t["corpus_prefill_tokens"] == 0 and "snapshot_load_s" in t
    code, out, _ = run_cli(capsys, *common)  # human output: answer, then sources with file:lines
    assert code == 0 and "Sources:" in out and "docs/" in out.split("Sources:")[1]


@pytest.mark.parametrize("case", ["no such file", "binary only", "malformed archive", "too large", "bad arguments",
                                  "no model"])
def test_bad_input_exits_2_with_json_error(capsys, tiny_model_dir, work, case):
    corpus, extra = {
        "no such file": ([work / "missing.txt"], []),
        "binary only": ([work / "blob.bin"], []),
        "malformed archive": ([work / "bad.zip"], []),
        "too large": ([work / "docs"], ["--max-context-tokens", "300"]),
        "bad arguments": ([work / "docs"], ["--max-new-tokens", "zero"]),
        "no model": ([work / "docs"], []),
    }[case]
    model = work / "no-model-here" if case == "no model" else tiny_model_dir
    argv = ["ask", "--corpus", *corpus, "--question", "q?", "--model", model, *extra]
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 2 and "Traceback" not in out + err
    error = json.loads(out)["error"]
    assert {"no such file": "no such file or directory", "binary only": "binary",
            "malformed archive": "malformed zip archive", "too large": "too large",
            "bad arguments": "--max-new-tokens", "no model": "no model folder"}[case] in error
    if case == "too large":
        assert "at most 225 fit" in error and "nothing was truncated" in error
    code, out, err = run_cli(capsys, *argv)  # without --json: message on stderr, nothing on stdout
    assert code == 2 and out == "" and err.startswith("error: ")


def test_bad_input_real_exit_status():
    p = subprocess.run([sys.executable, "-m", "runtime", "ask", "--corpus", "/nonexistent/x.txt", "--question", "q",
                        "--json"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert json.loads(p.stdout) == {"error": "/nonexistent/x.txt: no such file or directory", "code": "corpus"}


def test_snapshot_commands(capsys, tiny_model_dir, work, tmp_path):
    base = ["--model", tiny_model_dir, "--snapshot-dir", tmp_path, "--json"]
    code, out, _ = run_cli(capsys, "snapshot", "save", "--corpus", work / "docs", *base)
    saved = json.loads(out)
    assert code == 0 and not saved["reused"] and Path(saved["snapshot"]).parent == tmp_path
    code, out, _ = run_cli(capsys, "snapshot", "save", "--corpus", work / "docs", *base)
    assert code == 0 and json.loads(out)["reused"]
    code, out, _ = run_cli(capsys, "snapshot", "list", "--snapshot-dir", tmp_path, "--json")
    (listed,) = json.loads(out)["snapshots"]
    assert code == 0 and listed["key"] == saved["key"] and listed["complete"] and listed["tokens"] == saved["tokens"]
    code, out, _ = run_cli(capsys, "snapshot", "load", saved["key"], *base, "--question", "Hi?", "--max-new-tokens", "2")
    loaded = json.loads(out)
    assert code == 0 and loaded["tokens"] == saved["tokens"] and loaded["documents"] == 3
    assert isinstance(loaded["answer"], str) and loaded["timings"]["prefill_tokens"] < 10
    code, out, _ = run_cli(capsys, "snapshot", "load", "0" * 32, *base)
    assert code == 2 and "no such snapshot" in json.loads(out)["error"] and json.loads(out)["code"] == "snapshot"


def test_eval_without_its_module(capsys, monkeypatch):
    """eval imports runtime/evaluate.py lazily; a checkout without it gets a clear error, not a traceback."""
    real = importlib.import_module

    def without_evaluate(name, *args, **kw):
        if name == "runtime.evaluate":
            raise ModuleNotFoundError("No module named 'runtime.evaluate'", name="runtime.evaluate")
        return real(name, *args, **kw)
    monkeypatch.setattr(importlib, "import_module", without_evaluate)
    code, _, err = run_cli(capsys, "eval", "niah")
    assert code == 1 and "runtime/evaluate.py is missing" in err and "Traceback" not in err
