"""The item generators and haystacks shared by evaluation and training (runtime/tasks.py, runtime/haystacks.py):
the runtime imports nothing from train/ or bench/, the generators are pure, and the held-out haystack text is
checked against its manifest (runtime/haystacks.json) before an evaluation runs."""

import ast
import hashlib
import json
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from runtime import haystacks
from runtime import tasks as T

REPO = Path(__file__).resolve().parent.parent


def test_runtime_imports_nothing_from_train_or_bench():
    for f in sorted((REPO / "runtime").glob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert name.split(".")[0] not in ("train", "bench", "tasks", "corpus_sources"), f"{f.name}: {name}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in ("train/tasks.py", "bench", "tasks.py"), f"{f.name} loads {node.value}"
        assert "spec_from_file_location" not in f.read_text(), f"{f.name} loads a module by path"
    # and at run time: evaluation builds its cases with train/ and bench/ out of reach, without torch for tasks
    code = ("import sys\n"
            "sys.modules.update(train=None, bench=None)\n"
            "import runtime.tasks, runtime.haystacks\n"
            "assert 'torch' not in sys.modules\n"
            "import random, runtime.evaluate as ev\n"
            "from runtime.tokenizer import Tokenizer\n"
            "pool = runtime.tasks.TokenPool.from_texts(['Some text on a line.\\n' * 400], Tokenizer.default())\n"
            "hay, qas = ev.build_case('niah', random.Random(0), pool, Tokenizer.default(), 600, [0.5])\n"
            "assert qas[0].answer in hay\n"
            f"bad = [m for m in list(sys.modules.values()) if any(str(getattr(m, '__file__', '') or '')"
            f".startswith(str(p)) for p in ({str(REPO / 'train')!r}, {str(REPO / 'bench')!r}))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_training_uses_the_runtime_generators():
    import importlib.util

    spec = importlib.util.spec_from_file_location("longlens_train_tasks", REPO / "train" / "tasks.py")
    tasks = sys.modules["longlens_train_tasks"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)  # train/tasks.py by path: train/ stays off sys.path
    assert tasks.TokenPool is T.TokenPool and tasks.plant is T.plant and tasks.make_value is T.make_value


def test_plant_spans_cover_the_items_at_every_depth():
    """Each span is its item's text, also for items appended to a text that ends mid-line (a leading newline
    is added there; it once shifted the span, and with it the answer's source tokens, by one character)."""
    for hay in ("alpha beta\ngamma delta\nepsilon", "alpha beta\ngamma delta\n", ""):
        items = [(1.0, "The code for A is 123."), (0.0, "The code for B is 45."), (1.0, "The code for C is 6."),
                 (0.5, "The code for D is 78.")]
        text, spans = T.plant(hay, items)
        assert [text[a:b].rstrip("\n") for a, b in spans] == [s for _, s in items]
        rest = text
        for _, item in items:
            rest = rest.replace(item + "\n", "", 1)
        assert rest.rstrip("\n") == hay.rstrip("\n")  # the haystack is untouched (newlines added at its end)


def test_run_p_plants_runs_of_equal_digits():
    for fmt in ("number", "number:4-8"):
        vals = [T.make_value(random.Random(i), "train", fmt, run_p=1.0) for i in range(200)]
        assert all(re.search(r"(\d)\1", v) and v[0] != "0" and v.isdigit() for v in vals)
        lo = 3 if fmt == "number" else 4
        assert {len(v) for v in vals} == set(range(lo, 9))
        assert any(re.search(r"(\d)\1\1\1", v) for v in vals)  # runs of up to 4
        assert [T.make_value(random.Random(i), "train", fmt) for i in range(50)] == \
            [T.make_value(random.Random(i), "train", fmt, run_p=0.0) for i in range(50)]


def test_shipped_manifest_is_well_formed():
    man = haystacks.load_manifest()
    docs = man["documents"]
    assert len(docs) > 500 and len({d.key for d in docs}) == len(docs)
    assert all(re.fullmatch(r"[0-9a-f]{64}", d.sha256) and d.nbytes > 0 for d in docs)
    assert all(haystacks.split_of(d.key) == "heldout" for d in docs)
    # a 1M-token evaluation takes about 4.3 MB: every source is in that prefix
    total, used = 0, set()
    for d in docs:
        if total >= int(1048576 * 3.6) + 500_000:
            break
        total += d.nbytes
        used.add(d.key.split("/")[0])
    assert used == set(haystacks.SOURCES)
    assert {"pydoc", "gcide"} <= set(man["packages"])


# --------------------------------------------------------------------------------------------- verification
@pytest.fixture()
def machine(tmp_path, monkeypatch):
    """A fake /usr/share/doc with three files and a manifest that pins them (package "pkg" 1.0)."""
    root = tmp_path / "doc"
    texts = {"doc/pkg/README": "first text\n" * 50, "doc/pkg/NEWS": "second text\n" * 50,
             "doc/other/copyright": "third text\n" * 50}
    for key, text in texts.items():
        (root / key[4:]).parent.mkdir(parents=True, exist_ok=True)
        (root / key[4:]).write_text(text)
    monkeypatch.setattr(haystacks, "DOC_ROOT", root)
    docs = [[k, len(t.encode()), hashlib.sha256(t.encode()).hexdigest()] for k, t in texts.items()]
    path = tmp_path / "haystacks.json"
    path.write_text(json.dumps({"python": "3.11.7", "packages": {"doc/pkg": "pkg 1.0", "doc/other": "other 2.0"},
                                "documents": docs}))
    monkeypatch.setattr(haystacks, "MANIFEST", path)
    monkeypatch.delenv("LONGLENS_HAYSTACKS", raising=False)
    return types.SimpleNamespace(root=root, texts=texts, path=path, docs=docs)


def _repin(m, docs):
    m.path.write_text(json.dumps({"python": "3.11.7", "packages": {"doc/pkg": "pkg 1.0"}, "documents": docs}))


def test_pinned_texts_match(machine):
    assert haystacks.pinned_texts() == list(machine.texts.values())
    assert haystacks.pinned_texts(10) == [machine.texts["doc/pkg/README"]]  # the prefix that holds 10 bytes
    assert haystacks.check_documents(haystacks.load_manifest()["documents"], haystacks.load_manifest())[1] == []


def test_a_mismatching_sha_is_reported(machine):
    (machine.root / "pkg" / "NEWS").write_text("second text, another version\n" * 50)
    with pytest.raises(haystacks.HaystackError) as e:
        haystacks.pinned_texts()
    msg = str(e.value)
    assert "1 of the 3" in msg and "doc/pkg/NEWS" in msg and "sha256 differs" in msg and "README" not in msg
    assert "apt-get install -y pkg=1.0" in msg and str(machine.path) in msg and "LONGLENS_HAYSTACKS=warn" in msg
    assert haystacks.pinned_texts(10) == [machine.texts["doc/pkg/README"]]  # only the documents used are checked
    with pytest.warns(UserWarning, match="sha256 differs"):
        got = haystacks.pinned_texts(strict=False)  # warn and go on with this machine's text
    assert got[1].startswith("second text, another version")


def test_a_missing_file_names_its_package(machine, monkeypatch):
    (machine.root / "other" / "copyright").unlink()
    with pytest.raises(haystacks.HaystackError, match=r"doc/other/copyright .*: missing; install: apt-get install "
                                                      r"-y other=2\.0"):
        haystacks.pinned_texts()
    _repin(machine, [["stdlib/no_such_module.py", 10, "0" * 64]])
    with pytest.raises(haystacks.HaystackError, match=r"stdlib/no_such_module.py .*: missing; install: the "
                                                      r"standard library of CPython 3\.11\.7"):
        haystacks.pinned_texts()
    monkeypatch.setenv("LONGLENS_HAYSTACKS", "warn")
    with pytest.warns(UserWarning, match="missing"):
        assert haystacks.pinned_texts() == []


def test_evaluation_checks_the_manifest_before_running(machine):
    """The held-out pool of an evaluation (no --haystack) is the pinned one: a document that differs stops it
    before the model runs; user files are not pinned."""
    from runtime import evaluate
    from runtime.tokenizer import Tokenizer

    (machine.root / "pkg" / "README").write_text("edited\n" * 50)
    model = types.SimpleNamespace(eval=lambda: None)  # never called: the check comes first
    with pytest.raises(haystacks.HaystackError, match="doc/pkg/README"):
        evaluate.evaluate("niah", lengths=[256], depths=[0.5], n=1, model=model, tokenizer=Tokenizer.default())
    with pytest.warns(UserWarning, match="doc/pkg/README"):  # training's check: warns and goes on
        assert len(T.TokenPool.corpus("heldout", 10, Tokenizer.default(), strict=False)) > 0
    user = T.TokenPool.from_files([machine.root / "pkg" / "README"], Tokenizer.default())  # --haystack: unpinned
    assert len(user) > 0
