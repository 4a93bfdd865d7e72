"""Load (issue 7, item 4): 8 concurrent gradio_client sessions against a real `python launch.py` on loopback,
each uploading its own corpus and asking several questions, within a bounded time. Every request completes
(queued behind the one model slot, its position reported to the client), no answer cites another session's
documents, and after the clients leave their sessions are released (gradio's unload, fired when a client's
heartbeat drops) and the server's memory goes back to its baseline, wave after wave (see the memory note in
the test). The numbers are printed and go to load.json in the test's tmp_path; the tree's copy,
bench/results/load.json (BENCHMARKS.md, "Load test"), is written only by `bash scripts/refresh_results.sh load`
(LONGLENS_REFRESH=1), after a passing run.

    OMP_NUM_THREADS=1 python -m pytest tests/test_load.py -q
    LONGLENS_LOAD_WAVES=10 OMP_NUM_THREADS=1 python -m pytest tests/test_load.py -q -k eight   # 10 waves, not 3
"""

import json
import os
import platform
import re
import threading
import time
from pathlib import Path

import pytest

from helpers import launch_app, text_of, wait_until, write_files
from live_server import REPO, Server

CLIENTS = 8
QUESTIONS = 4
BUDGET_S = 90  # the whole wave: uploads, prefills, answers
RESULT = REPO / "bench" / "results" / "load.json"  # only with LONGLENS_REFRESH=1 (scripts/refresh_results.sh)
ASKED = ["What does the log say about {w}?", "Which line mentions the {w} gauge?", "Summarise the {w} notes.",
         "Where is {w} configured?", "What is the {w} threshold?", "Who wrote the {w} entry?"]


def corpus_for(folder: Path, i: int) -> list[Path]:
    w = f"s{i}word"
    return write_files(folder, {
        f"s{i}_log.txt": "".join(f"{w} log {k}: the {w} gauge read {17 * k + i} at dawn\n" for k in range(40)),
        f"s{i}_notes.md": f"# {w} notes\n\n" + "".join(f"- {w} item {k}: threshold {k * i}\n" for k in range(30)),
    })


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.completed = self.errors = self.foreign = 0
        self.problems: list[str] = []
        self.ranks: list[int] = []  # per request reported queued: the furthest back it was
        self.latencies: list[float] = []

    def ok(self, seconds: float) -> None:
        with self.lock:
            self.completed += 1
            self.latencies.append(seconds)

    def fail(self, what: str) -> None:
        with self.lock:
            self.errors += 1
            self.problems.append(what[:300])


def run(job, tally: Tally, what: str, deadline: float):
    """Wait for a gradio_client job, noting the queue positions it reports; its result or None."""
    from gradio_client.utils import Status

    t0, rank = time.time(), None

    def done() -> bool:  # noting the queue position on the way
        nonlocal rank
        st = job.status()
        if st.code == Status.IN_QUEUE and st.rank is not None:
            rank = max(rank or 0, st.rank)
        return job.done()

    try:
        if not wait_until(done, timeout=max(0.0, deadline - time.time())):
            raise TimeoutError(f"{what}: not done within the budget")
        out = job.result(timeout=5)
    except Exception as e:  # noqa: BLE001 -- every failure is counted and reported
        tally.fail(f"{what}: {type(e).__name__}: {e}")
        return None
    finally:
        if rank is not None:
            with tally.lock:
                tally.ranks.append(rank)
    tally.ok(time.time() - t0)
    return out


def session(url: str, i: int, folder: Path, tally: Tally, deadline: float, questions: int = QUESTIONS,
            peers: range = range(CLIENTS)) -> None:
    from gradio_client import Client, handle_file

    try:
        c = Client(url, verbose=False)
    except Exception as e:  # noqa: BLE001
        tally.fail(f"client {i}: connect: {e}")
        return
    try:
        mine = corpus_for(folder, i)
        out = run(c.submit([handle_file(str(p)) for p in mine], api_name="/load_files"), tally, f"{i} load", deadline)
        if out is None:
            return
        if "Corpus ready" not in out[0]:
            tally.fail(f"client {i}: load: {re.sub('<[^>]+>', ' ', out[0])}")
            return
        for q in range(questions):
            question = ASKED[(i + q) % len(ASKED)].format(w=f"s{i}word")
            out = run(c.submit(question, 4, 0.0, -1, api_name="/ask"), tally, f"{i} ask {q}", deadline)
            if out is None:
                return
            chat, chips, _ = out
            cited = chips + "".join(re.findall(r'll-msg-sources">(.*?)</div>', "".join(text_of(m) for m in chat)))
            others = {f"s{j}_" for j in peers if j != i} & set(re.findall(r"s\d+_", cited))
            if len(chat) != 2 * (q + 1) or f"s{i}_" not in chips or others:
                with tally.lock:
                    tally.foreign += bool(others)
                tally.fail(f"client {i} ask {q}: {len(chat)} messages, chips {chips[:200]!r}")
    finally:
        c.close()  # the heartbeat drops: gradio fires unload, the app releases the session


def wave(url: str, folder: Path, tally: Tally, deadline: float, first: int = 0) -> None:
    """CLIENTS sessions at once (numbered first, first + 1, ...), each in its own thread, within the deadline."""
    threads = [threading.Thread(target=session, args=(url, first + i, folder / f"c{i}", tally, deadline, QUESTIONS,
                                                      range(first, first + CLIENTS)))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline + 10 - time.time()))
    assert not any(t.is_alive() for t in threads), "sessions still running past the budget"


def session_folders(s: Server) -> list[str]:
    """What the server keeps for live sessions: uploads, spilled sessions, session snapshots."""
    root = s.private_dir
    if not root.is_dir():
        return []
    out = [f"uploads/{p.name}" for p in (root / "uploads").iterdir()] if (root / "uploads").is_dir() else []
    out += [f"corpora/{p.name}" for p in (root / "corpora").iterdir()] if (root / "corpora").is_dir() else []
    out += [p.name for p in root.iterdir() if p.name not in ("uploads", "corpora")]
    return out


def wait_released(s: Server, timeout: float = 30) -> float:
    t0 = time.time()
    assert wait_until(lambda: not session_folders(s), timeout, interval=0.2), \
        f"sessions not released: {session_folders(s)}"
    return time.time() - t0


def settled_rss(s: Server, seconds: float = 2.0) -> int:
    """The server's RSS once it stops moving (the lowest of a few samples over `seconds`)."""
    samples = []
    for _ in range(int(seconds / 0.25)):  # sampling over time is the point: no event says "settled"
        samples.append(s.rss())
        time.sleep(0.25)
    return min(samples)


def test_prefill_allocation_policy():
    """glibc keeps freed large blocks only while a prefill runs (app/sessions.py: large_allocations); after it,
    and in a server started with the benchmarks' MALLOC_* environment, they go back to the OS. In a child
    process: the policy is process-wide."""
    import subprocess
    import sys

    code = """
from app.sessions import large_allocations, malloc_defaults
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
malloc_defaults()
base = rss()
with large_allocations():
    with large_allocations():  # nested (two prefills at once): the tuning holds until the last one ends
        b = bytearray(96 << 20)
        del b
    inside = rss()
after = rss()
b = bytearray(96 << 20)
del b
print(base, inside, after, rss())
"""
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    base, inside, after, later = map(int, out.stdout.split())
    assert inside - base >= 80, out.stdout  # kept for the next chunk's temporaries
    assert after - base <= 16 and later - base <= 16, out.stdout  # returned at the end, and by default


@pytest.mark.slow
def test_eight_concurrent_sessions(tiny_model_dir, tmp_path):
    MiB = 1 << 20
    with Server(tiny_model_dir, tmp_path / "snaps", "--max-sessions", "4", "--max-file-size", "256kb",
                temp_dir=tmp_path / "gradio") as s:
        fresh = settled_rss(s)
        # a first wave warms the process up (lazy imports, thread pools, first allocations at this concurrency),
        # so the baseline is the RSS after it: a wave that leaves anything behind shows as growth over it
        warm = Tally()
        wave(s.url, tmp_path / "warm", warm, time.time() + BUDGET_S, first=100)
        assert warm.errors == 0, warm.problems
        wait_released(s)
        baseline = settled_rss(s)

        tally, peak, done = Tally(), [baseline], threading.Event()

        def sample():  # every 50 ms until the wave is over
            while True:
                peak[0] = max(peak[0], s.rss())
                if done.wait(0.05):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.time()
        wave(s.url, tmp_path / "wave", tally, t0 + BUDGET_S)
        wave_s = time.time() - t0
        released_s = wait_released(s)
        done.set()
        sampler.join()
        after = settled_rss(s)
        peak_hwm = s.hwm()
        series = [after]  # two more waves (LONGLENS_LOAD_WAVES=N: N in all): nothing may pile up wave after wave
        for k in range(1, int(os.environ.get("LONGLENS_LOAD_WAVES", "3"))):
            more = Tally()
            wave(s.url, tmp_path / f"wave{k}", more, time.time() + BUDGET_S, first=100 * (k + 1))
            assert more.errors == 0, more.problems
            wait_released(s)
            series.append(settled_rss(s))

    result = {
        "test": "tests/test_load.py::test_eight_concurrent_sessions",
        "command": (f"LONGLENS_LOAD_WAVES={len(series)} " if len(series) != 3 else "")
        + "OMP_NUM_THREADS=1 python -m pytest tests/test_load.py -q -k eight",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"load average {os.getloadavg()[0]:.2f}",
        "server": "python launch.py --max-sessions 4 --max-file-size 256kb (concurrency 1), random tiny model, "
                  "OMP_NUM_THREADS=1",
        "clients": CLIENTS, "questions_per_client": QUESTIONS,
        "requests": CLIENTS * (1 + QUESTIONS), "requests_completed": tally.completed, "errors": tally.errors,
        "answers_citing_another_session": tally.foreign,
        "requests_reported_queued": len(tally.ranks), "max_queue_position": max(tally.ranks, default=None),
        "wave_s": round(wave_s, 1), "budget_s": BUDGET_S,
        "request_latency_s": {"median": round(sorted(tally.latencies)[len(tally.latencies) // 2], 2)
                              if tally.latencies else None,
                              "max": round(max(tally.latencies, default=0), 2)},
        "released_after_leaving_s": round(released_s, 1),
        "rss_fresh_mib": round(fresh / MiB, 1), "rss_baseline_mib": round(baseline / MiB, 1),
        "rss_baseline_is": "the server's RSS after a first, unmeasured wave of 8 sessions had come and gone",
        "rss_peak_mib": round(peak[0] / MiB, 1),
        "rss_peak_vmhwm_mib": round(peak_hwm / MiB, 1), "rss_after_mib": round(after / MiB, 1),
        "rss_after_each_wave_mib": [round(x / MiB, 1) for x in series],
        "problems": tally.problems[:10],
    }
    name = "load.json" if len(series) == 3 else "load-waves.json"
    (tmp_path / name).write_text(json.dumps(result, indent=1) + "\n")  # a test run writes nothing in the tree
    print(json.dumps(result, indent=1))

    assert tally.errors == 0, tally.problems
    assert tally.completed == CLIENTS * (1 + QUESTIONS)
    assert tally.foreign == 0
    assert tally.ranks and max(tally.ranks) >= 1, "no request was reported queued behind another"
    assert wave_s < BUDGET_S
    # Memory: the sessions' objects are all freed (test_sessions_leave_nothing_behind counts them), and the
    # freed pages go back to the OS: when a session is released (app/sessions.py: give_back_memory), and
    # because glibc keeps its large-block tuning to prefills (large_allocations). With that tuning set for
    # the whole process, RSS after each wave crept up (520, 556, 583, 584 MiB over four waves, 2026-11-29,
    # ~90 MiB over the baseline by the third): each worker thread's arena stayed at its high-water mark.
    # Now, over three waves: 519, 523, 521 and 521, 535, 534 MiB (baselines 491 and 492) in two full runs.
    # What stays over the baseline is allocator slack and gradio's bounded record of past sessions.
    assert max(series) - baseline <= 64 * MiB, result
    assert series[-1] - series[0] <= 32 * MiB, result  # no creep (it was ~30 MiB a wave)
    if os.environ.get("LONGLENS_REFRESH"):  # scripts/refresh_results.sh load: the tracked result, once it passed
        RESULT.with_name(name).write_text(json.dumps(result, indent=1) + "\n")


@pytest.mark.slow
def test_sessions_leave_nothing_behind(tiny_model_dir, tmp_path):
    """In this process, to look inside: after 8 concurrent clients leave, none of their sessions, caches,
    layouts or answers survives, their files are gone, and gradio keeps a bounded record of past sessions."""
    import gc

    from app.workspace import TurnView, Workspace
    from runtime.cache import Cache
    from runtime.corpus import Layout
    from runtime.engine import Session
    from runtime.provenance import Provenance

    os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "0.5"  # read per heartbeat connection: quick unloads
    kinds = (Session, Cache, Workspace, TurnView, Layout, Provenance)

    def alive():
        gc.collect()
        objs = gc.get_objects()
        return {t.__name__: sum(isinstance(o, t) for o in objs) for t in kinds}

    before = alive()
    demo, url = launch_app(tiny_model_dir, tmp_path / "snaps", max_sessions=4, max_file_bytes=256 << 10)
    try:
        registry, files = demo.longlens.registry, demo.longlens.files
        tally = Tally()
        wave(url, tmp_path / "wave", tally, time.time() + BUDGET_S)
        assert tally.errors == 0 and tally.completed == CLIENTS * (1 + QUESTIONS), tally.problems
        wait_until(lambda: len(registry) == 0, timeout=30, interval=0.1)
        assert len(registry) == 0, "sessions not released after their clients left"
        wait_until(lambda: alive() == before, timeout=15, interval=0.5)  # a handler may be finishing its last message
        assert alive() == before, "session state survived its session"
        assert not any((files.root / "uploads").iterdir()) and not any(files.corpora.iterdir())
        assert {p.name for p in files.root.iterdir()} <= {"uploads", "corpora"}  # no spilled session either
        assert demo.state_session_capacity == 64  # gradio's record of past sessions is bounded...
        # ...and a closed page's record is dropped (app/ui.py drop_page_state)
        wait_until(lambda: len(demo.state_holder.session_data) == 0, timeout=10, interval=0.2)
        assert len(demo.state_holder.session_data) == 0, list(demo.state_holder.session_data)
    finally:
        demo.close()
        os.environ.pop("GRADIO_HEARTBEAT_INTERVAL", None)
