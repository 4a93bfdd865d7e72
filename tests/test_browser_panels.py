"""The page's panels hold their content at any corpus size, in a real browser (Playwright driving
Debian's chromium, never `playwright install`): a zip of 300 small Python files, as a new user drops
a source tree, gives a documents table that scrolls inside the corpus panel instead of spilling over
the KV cache ledger, the panels below and the page footer; the ledger's axis reads binary units.

The app runs as its own process (`python launch.py`, tests/live_server.py) with the shipped model:
300 files of two lines prefill in seconds. A screenshot goes to artifacts/.
"""

import re
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, SHIPPED

ARTIFACTS = REPO / "artifacts"
N_FILES = 300

pytestmark = [pytest.mark.browser,  # chromium missing: a failure under CI, a skip elsewhere (conftest.py)
              pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no model in assets/model")]

# Boxes of the page's parts; the table's box as it shows: clipped by every ancestor that clips.
BOXES = """() => {
    const box = (el) => { if (!el) return null; const r = el.getBoundingClientRect();
        return { left: r.left, top: r.top, right: r.right, bottom: r.bottom }; };
    const table = document.querySelector('#ll-docs table');
    let shown = box(table), clipper = null;
    for (let el = table.parentElement; el && el !== document.body; el = el.parentElement) {
        const s = getComputedStyle(el);
        if (s.overflowY !== 'visible' || s.overflowX !== 'visible') {
            const r = box(el);
            clipper = clipper || el;
            shown = { left: Math.max(shown.left, r.left), top: Math.max(shown.top, r.top),
                      right: Math.min(shown.right, r.right), bottom: Math.min(shown.bottom, r.bottom) };
        }
    }
    return { table: box(table), shown, panel: box(document.querySelector('#ll-corpus')),
             ledger: box(document.querySelector('#ll-ledger')), inspector: box(document.querySelector('#ll-inspector')),
             footer: box(document.querySelector('footer')),
             scroll: clipper && { top: clipper.scrollTop, height: clipper.scrollHeight, client: clipper.clientHeight } };
}"""


def source_tree_zip(folder: Path, n: int = N_FILES) -> Path:
    """A zip of `n` tiny Python modules in a few packages."""
    path = folder / "project.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            z.writestr(f"project/pkg{i // 50}/module_{i:03d}.py", f"def f{i}():\n    return {i}\n")
    return path


def inside(inner: dict, outer: dict, slack: float = 1.0) -> bool:
    return (inner["left"] >= outer["left"] - slack and inner["right"] <= outer["right"] + slack
            and inner["top"] >= outer["top"] - slack and inner["bottom"] <= outer["bottom"] + slack)


def overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def test_a_large_corpus_stays_inside_its_panel(shipped_server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(shipped_server.url)
    page.wait_for_selector("#ll-drop", timeout=30_000)
    page.set_input_files("#ll-drop input[type=file]", str(source_tree_zip(tmp_path)))
    page.wait_for_selector("#ll-status .ll-ok, #ll-status .ll-warn", timeout=120_000)
    assert f"{N_FILES} document(s)" in page.locator("#ll-status").inner_text()
    docs = page.locator("#ll-docs").inner_text()
    assert "project/pkg0/module_000.py" in docs and f"and {N_FILES - 200} more documents" in docs
    page.wait_for_function("() => document.querySelectorAll('#ll-ledger .xtick text').length > 0", timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "panels-300-documents.png"), full_page=True)

    b = page.evaluate(BOXES)
    assert b["table"]["bottom"] - b["table"]["top"] > 2000, b  # a long table: it must scroll...
    assert b["scroll"]["height"] > b["scroll"]["client"] + 1000, b  # ...inside its own box
    assert inside(b["shown"], b["panel"]), b
    assert not overlap(b["shown"], b["ledger"]) and b["shown"]["bottom"] <= b["ledger"]["top"] + 1, b
    assert inside(b["ledger"], b["panel"]), b
    assert b["panel"]["bottom"] <= b["inspector"]["top"] + 1, b  # the panels below start under it
    assert not overlap(b["shown"], b["footer"]) and not overlap(b["shown"], b["inspector"]), b
    # what is painted on the ledger is the ledger, not a table row on top of it
    page.locator("#ll-ledger").scroll_into_view_if_needed()
    led = page.evaluate(BOXES)["ledger"]
    centre = [(led["left"] + led["right"]) / 2, (led["top"] + led["bottom"]) / 2]
    assert page.evaluate("([x, y]) => !!document.elementFromPoint(x, y).closest('#ll-ledger')", centre)

    # the table's last row can be scrolled to, and it then shows inside the panel
    page.evaluate("() => { const t = document.querySelector('#ll-docs table'); let el = t.parentElement;"
                  " while (el && getComputedStyle(el).overflowY === 'visible') el = el.parentElement;"
                  " el.scrollTop = el.scrollHeight; }")
    last = page.locator("#ll-docs tbody tr").last
    assert "more documents" in last.inner_text()
    row = last.bounding_box()
    assert row is not None and inside({"left": row["x"], "top": row["y"], "right": row["x"] + row["width"],
                                       "bottom": row["y"] + row["height"]}, page.evaluate(BOXES)["shown"], slack=2)

    # the ledger's axis is in binary units ("48 KiB"), never an SI count of bytes ("0.5B", "1M")
    ticks = [t for t in page.evaluate("() => [...document.querySelectorAll('#ll-ledger .xtick text')]"
                                      ".map((t) => t.textContent)") if t.strip()]
    assert ticks and all(re.fullmatch(r"[\d.,]+ (B|KiB|MiB|GiB|TiB)", t.strip()) for t in ticks), ticks
    assert any(not t.strip().startswith("0 ") for t in ticks), ticks
    page.close()
