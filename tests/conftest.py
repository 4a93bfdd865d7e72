"""Fixtures shared across test files: the random tiny model folder, the shipped model and engine, and
one torch thread for tiny models. Tests import helpers from here (or tests/hf_oracle.py), never from
another test module."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from hf_oracle import CSA, HCA, SL, random_hf_model, tiny_config

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
SHIPPED = ASSETS / "model"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread hand-offs cost more than their math (10x more on a busy shared machine).
    Modules that want it for every test declare `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
