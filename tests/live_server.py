"""Test helper: the real app as a separate process (`python launch.py ...`) on loopback, for tests that
kill it, restart it or measure its memory from outside."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_context_model(tiny: Path, dest: Path, context: int = 32768) -> Path:
    """The tiny random model with a longer context (same weights): room for a prefill that takes seconds."""
    if not (dest / "config.json").exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tiny, tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["max_position_embeddings"] = context
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tmp.rename(dest)
    return dest


class Server:
    """`python launch.py --model M --port P --snapshot-dir D [args]`, started and waited for."""

    def __init__(self, model_dir, snapshot_dir, *args: str, temp_dir=None, env: dict | None = None,
                 timeout: float = 90, ranks: int = 1):
        """ranks > 1: under `torchrun --standalone --nproc-per-node ranks` (gloo on this CPU)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.snapshot_dir = Path(snapshot_dir)
        self.log: list[str] = []
        self._started = threading.Event()  # set by the reader: "Local URL" printed, or the output closed
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                    "HF_HUB_OFFLINE": "1", "GRADIO_HEARTBEAT_INTERVAL": "0.5", **(env or {})}
        if temp_dir is not None:
            full_env["GRADIO_TEMP_DIR"] = str(temp_dir)
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            full_env.pop(k, None)
        runner = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                                     if ranks > 1 else [])
        self.proc = subprocess.Popen(
            [*runner, str(REPO / "launch.py"), "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--snapshot-dir", str(snapshot_dir), *args],
            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._started.wait(timeout)
        if not any(line.startswith("Local URL") for line in self.log):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if line.startswith("Local URL"):
                self._started.set()
        self._started.set()  # the process ended (or closed its output): nothing more will come

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def private_dir(self) -> Path:
        """The process's own folder for its users' files (app/sessions.py: process_spill_dir)."""
        return self.snapshot_dir / ".sessions" / str(self.pid)

    def rss(self) -> int:
        """Resident memory now (bytes)."""
        return _status_kib(self.pid, "VmRSS") * 1024

    def hwm(self) -> int:
        """Peak resident memory so far (bytes)."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)
