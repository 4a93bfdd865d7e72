"""The page in a real browser (Playwright driving Debian's chromium, never `playwright install`):
drop files onto the page, ask, watch the answer stream and the heatmap appear, click a source chip
and a heatmap cell, see the queue position while another user's job runs. Screenshots go to
artifacts/ (ignored by git). The README's assets/screenshot.png is replaced only with LONGLENS_REFRESH=1
(`bash scripts/refresh_results.sh screenshot`): a test run writes no tracked file.

Uses the shipped model when assets/model exists (a readable screenshot), else a random tiny one.
"""

import os
import shutil
from pathlib import Path

import pytest

from helpers import ASSETS, REPO, SHIPPED, client, launch_app, wait_until

ARTIFACTS = REPO / "artifacts"
EXAMPLES = ASSETS / "examples"
QUESTION = "What is the access code for the misty lighthouse?"

pytestmark = pytest.mark.browser  # chromium missing: a failure under CI, a skip elsewhere (conftest.py)

# Chatbot messages in gradio 6: the last bot bubble's text
LAST_BOT = "() => { const m = document.querySelectorAll('#ll-chat .bot'); return m.length ? m[m.length - 1].innerText : ''; }"


@pytest.fixture(scope="module")
def app(request, tmp_path_factory):
    """The app served in this process, on the shipped model (the random tiny one without it)."""
    model = SHIPPED if (SHIPPED / "config.json").is_file() else request.getfixturevalue("tiny_model_dir")
    demo, url = launch_app(model, tmp_path_factory.mktemp("snapshots"))
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def busy_app(app, request, tmp_path_factory):
    """An app whose model keeps answering for a while: the random tiny one never says EOS early
    to the greedy prompt below (a trained model might), so its job holds the queue."""
    if app[0].longlens.settings.model_dir != SHIPPED:
        yield app
        return
    demo, url = launch_app(request.getfixturevalue("tiny_model_dir"), tmp_path_factory.mktemp("snapshots-busy"))
    yield demo, url
    demo.close()


def drop_files(page, selector: str, paths: list[Path]) -> None:
    """A real drop event carrying the files (as a desktop drag and drop delivers them)."""
    files = [{"name": p.name, "text": p.read_text()} for p in paths]
    dt = page.evaluate_handle("""(files) => {
        const dt = new DataTransfer();
        for (const f of files) dt.items.add(new File([f.text], f.name, { type: 'text/plain' }));
        return dt; }""", files)
    page.dispatch_event(selector, "dragenter", {"dataTransfer": dt})
    page.dispatch_event(selector, "dragover", {"dataTransfer": dt})
    page.dispatch_event(selector, "drop", {"dataTransfer": dt})


def heatmap_cell(page) -> dict | None:
    """Screen position of a selected (non-empty) heatmap cell."""
    return page.evaluate("""() => {
        const gd = document.querySelector('#ll-heatmap .js-plotly-plot');
        if (!gd || !gd._fullData || !gd._fullData.length || gd._fullData[0].type !== 'heatmap') return null;
        const tr = gd._fullData[0], xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, bb = gd.getBoundingClientRect();
        let best = null;
        tr.z.forEach((row, r) => row.forEach((v, c) => {
            if (v !== null && !Number.isNaN(v) && (!best || v > best.v)) best = { v, r, c };
        }));
        if (!best) return null;
        const x = (tr.x[best.c] + tr.x[best.c + 1]) / 2;
        return { x: bb.left + xa._offset + xa.l2p(x), y: bb.top + ya._offset + ya.l2p(best.r) }; }""")


def test_drop_ask_inspect(app, browser):
    demo, url = app
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#ll-drop", timeout=30_000)

    # drop two files onto the upload area: prefill runs, the documents table lists them
    drop_files(page, "#ll-drop button", [EXAMPLES / "lighthouse_log.md", EXAMPLES / "tides.csv"])
    page.wait_for_selector("#ll-status .ll-ok, #ll-status .ll-warn", timeout=60_000)
    docs = page.locator("#ll-docs").inner_text()
    assert "lighthouse_log.md" in docs and "tides.csv" in docs
    page.screenshot(path=str(ARTIFACTS / "01-corpus.png"), full_page=True)

    # ask: the answer streams (several distinct partial texts), then sources and the heatmap appear
    page.evaluate("""() => { window.__llSeen = new Set();
        new MutationObserver(() => { const m = document.querySelectorAll('#ll-chat .bot');
            if (m.length) window.__llSeen.add(m[m.length - 1].innerText); })
        .observe(document.querySelector('#ll-chat'), { subtree: true, childList: true, characterData: true }); }""")
    page.fill("#ll-question textarea", QUESTION)
    page.click("#ll-ask")
    page.wait_for_selector("#ll-chips .ll-chip", timeout=60_000)
    assert page.evaluate(LAST_BOT).strip()
    if app[0].longlens.settings.model_dir == SHIPPED:  # the trained model copies the planted value
        assert page.evaluate(LAST_BOT).strip().startswith("5820417")
    assert page.evaluate("() => window.__llSeen.size") >= 2, "the answer did not stream"
    page.wait_for_function("() => { const gd = document.querySelector('#ll-heatmap .js-plotly-plot');"
                           " return gd && gd._fullData && gd._fullData.length && gd._fullData[0].type === 'heatmap'; }",
                           timeout=30_000)

    # a source chip opens the document at its lines
    chip = page.locator("#ll-chips .ll-chip").first
    label = chip.inner_text().split("\n")[0]
    chip.click()
    name = label.rsplit(":", 1)[0]
    page.wait_for_function("(n) => { const h = document.querySelector('#ll-viewer .ll-viewer-head');"
                           " return h && h.innerText.includes(n) && h.innerText.includes('source 1'); }",
                           arg=name, timeout=15_000)
    assert page.locator("#ll-viewer .ll-target").count() >= 1
    page.locator("#ll-viewer").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "02-answer.png"), full_page=True)

    # a heatmap cell opens the heaviest block it holds
    page.locator("#ll-heatmap").scroll_into_view_if_needed()
    cell = heatmap_cell(page)
    assert cell is not None
    page.mouse.click(cell["x"], cell["y"])
    page.wait_for_function("() => (document.querySelector('#ll-viewer .ll-viewer-head') || {}).innerText"
                           "?.includes('picked by CSA layer')", timeout=15_000)
    page.screenshot(path=str(ARTIFACTS / "03-heatmap-click.png"), full_page=True)

    # the sources inside the chat message open the viewer too
    page.locator("#ll-chat .ll-msg-sources .ll-chip").first.click()
    page.wait_for_function("() => (document.querySelector('#ll-viewer .ll-viewer-head') || {}).innerText"
                           "?.includes('source 1 of answer 1')", timeout=15_000)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "screenshot.png"), full_page=True)
    if os.environ.get("LONGLENS_REFRESH"):  # scripts/refresh_results.sh screenshot: the README's picture
        shutil.copy(ARTIFACTS / "screenshot.png", REPO / "assets" / "screenshot.png")

    # leaving the page releases the session (demo.unload)
    registry = demo.longlens.registry
    assert len(registry) == 1
    page.close()
    wait_until(lambda: len(registry) == 0, timeout=20, interval=0.2)
    assert len(registry) == 0


def test_queue_position_is_shown(busy_app, browser):
    """While another user's answer holds the one model slot, this page's job shows its place in line."""
    demo, url = busy_app
    other = client(url)
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#ll-sample", timeout=30_000)
    job = other.submit("Tell me everything.", 512, 0.0, -1, api_name="/ask")
    wait_until(job.outputs, timeout=30)  # its first piece: the job holds the model slot
    try:
        page.click("#ll-sample")
        page.wait_for_function("() => /queue:?\\s*\\d+\\s*\\/\\s*\\d+/i.test(document.body.innerText)", timeout=15_000)
        page.screenshot(path=str(ARTIFACTS / "04-queued.png"))
    finally:
        other.predict(api_name="/stop")
        job.result(timeout=60)
    page.wait_for_selector("#ll-status .ll-ok, #ll-status .ll-warn", timeout=60_000)
    page.close()


def test_folder_upload_keeps_paths(app, browser, tmp_path):
    """A folder picked with "Upload a folder…" keeps its inner paths as document names; hidden
    folders are left out, as ingestion does for folders on disk."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "README.md").write_text("# project\nThe access code for the misty lighthouse is 5820417.\n")
    (root / "src" / "main.py").write_text("print('hello')\n")
    (root / ".git" / "config").write_text("[core]\n")
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(app[1])
    page.wait_for_selector("#ll-drop", timeout=30_000)
    folder_input = page.locator("input[type=file][webkitdirectory]")
    folder_input.set_input_files(str(root))
    page.wait_for_selector("#ll-status .ll-ok, #ll-status .ll-warn", timeout=60_000)
    docs = page.locator("#ll-docs").inner_text()
    assert "project/README.md" in docs and "project/src/main.py" in docs and ".git" not in docs
    page.close()
