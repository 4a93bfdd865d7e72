"""What `launch.py` tells the app: model, device, limits and where snapshots live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "assets" / "model"


@dataclass
class Settings:
    model_dir: str | Path = SHIPPED_MODEL
    device: str = "auto"  # auto: CUDA when present, else CPU
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    index_dtype: str = "auto"  # the indexer's keys; auto: runtime/isa.py's choice for the device and CPU
    prefill_dtype: str | None = None  # prefill's HCA pass (runtime.load_model): None = $LONGLENS_PREFILL_DTYPE or auto
    max_file_bytes: int = 50 << 20  # largest single upload (also enforced on archive members)
    max_files: int = 2000  # most files per corpus, archive members included
    max_context: int | None = None  # most tokens per session (None: the model's context)
    max_sessions: int = 8  # sessions resident in memory; the least recently used idle one is evicted
    snapshot_dir: str | Path = REPO / "runs" / "snapshots"
    concurrency: int = 1  # model jobs at once, across all users
    chunk_size: int = 2048  # prefill chunk (tokens): one progress step each

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def resolved_index_dtype(self):
        from runtime import isa

        return isa.resolve(self.index_dtype, self.resolved_device())

    def is_shipped_model(self) -> bool:
        try:
            return Path(self.model_dir).resolve() == SHIPPED_MODEL.resolve()
        except OSError:
            return False
