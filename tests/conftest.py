"""Fixtures shared across test files: one torch thread for the run, the random tiny model folder, the
shipped model and engine, a small corpus, the app served in this process, and a headless chromium for
the `browser` tests (which fail under CI when chromium is missing, and skip elsewhere). Plain helpers
are in tests/helpers.py (and hf_oracle.py, live_server.py); no test module imports another."""

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# gradio reads its upload folder when imported: set before any test module imports it (removed at the end)
_GRADIO_TEMP = None
if "GRADIO_TEMP_DIR" not in os.environ:
    _GRADIO_TEMP = os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="longlens-gradio-")

import pytest
import torch

# The suite runs the eager decode step (the reference): compiling the fast one (runtime/compiled.py) costs
# 6-60 s per model and process, and tests/test_compiled.py checks the two agree. Subprocesses inherit it.
os.environ.setdefault("LONGLENS_DECODE", "eager")
# Likewise prefill's HCA pass in the model's own dtype (the reference; "auto" is bf16 on a CPU with AMX):
# tests/test_isa.py checks the bf16 pass against it.
os.environ.setdefault("LONGLENS_PREFILL_DTYPE", "model")

from helpers import ASSETS, SHIPPED, launch_app, write_corpus
from hf_oracle import CSA, HCA, SL, random_hf_model, tiny_config

CHROMIUM = Path("/usr/bin/chromium")


def make_tiny_model_dir(base: Path) -> Path:
    """A random tiny DeepSeek-V4 with the shipped 8192-token tokenizer under `base` (built once)."""
    folder = base / "longlens-tiny-model"
    if not (folder / "tokenizer.json").exists():
        # index_topk above the entry count: chunked and one-shot prefill cannot differ by top-k near-ties
        cfg = tiny_config(vocab_size=8192, layer_types=[SL, CSA, HCA, CSA], index_topk=512,
                          max_position_embeddings=4096)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        random_hf_model(cfg, seed=3).save_pretrained(tmp)
        shutil.copy(ASSETS / "tokenizer.json", tmp / "tokenizer.json")
        tmp.rename(folder)
    return folder


def pytest_unconfigure(config):
    if _GRADIO_TEMP:
        shutil.rmtree(_GRADIO_TEMP, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every model in the suite is tiny: torch's thread hand-offs cost more than their math (two files of
    tiny-model tests took 8 s on one thread, 56 s on two, on the busy 2-core machine). Set for the whole
    run, so a file's time does not depend on which files ran before it; a test that wants more threads
    sets them itself and puts them back."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def corpus_paths(tmp_path_factory) -> list[Path]:
    """helpers.write_corpus's three files (the needle at b.txt:17), written once per test module."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def shipped_model():
    import runtime

    return runtime.load_model(SHIPPED)


@pytest.fixture(scope="session")
def shipped_tokenizer():
    from runtime.tokenizer import Tokenizer

    return Tokenizer.from_file(SHIPPED / "tokenizer.json")


@pytest.fixture(scope="session")
def shipped_engine(shipped_model, shipped_tokenizer):
    from runtime import Engine

    return Engine(shipped_model, shipped_tokenizer, model_dir=SHIPPED)


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory, request):
    """The app on the random tiny model, served in this process for one test module: (demo, url).
    A module sets its own settings (helpers.launch_app's keywords) with `APP_SETTINGS = {...}`."""
    settings = getattr(request.module, "APP_SETTINGS", {})
    demo, url = launch_app(tiny_model_dir, tmp_path_factory.mktemp("snapshots"), **settings)
    yield demo, url
    demo.close()


# ------------------------------------------------------------------------------------ browser tests
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A `browser` test without chromium: a failure under CI (CI=true; scripts/test.sh installs chromium,
    so a missing one is a broken setup, not a reason to skip), a skip on a developer's machine."""
    if item.get_closest_marker("browser") is None or CHROMIUM.exists():
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI={os.environ['CI']} and no chromium at {CHROMIUM}: the browser tests must run in CI "
                    "(scripts/test.sh installs it: apt-get install -y chromium, as root)", pytrace=False)
    pytest.skip(f"needs Debian chromium at {CHROMIUM}: apt-get install -y chromium")


@pytest.fixture(scope="module")
def browser():
    """Headless chromium through Playwright (Debian's binary: never `playwright install`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    """`python launch.py` with the shipped model in a process of its own (uploads up to 1 MB each), with its
    own snapshot and gradio folders: what the browser tests drive."""
    from live_server import Server

    tmp = tmp_path_factory.mktemp("server")
    with Server(SHIPPED, tmp / "snapshots", "--max-file-size", "1mb", temp_dir=tmp / "gradio") as s:
        yield s
