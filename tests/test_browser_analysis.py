"""The inspector's views over answer tokens and over the conversation, in a real browser (Playwright driving
Debian's chromium, never `playwright install`). The shipped model answers two questions over a small corpus
(the sample's files and a long almanac no question is about, so some of it is never read), then:

- token span: a click on an answer token, a shift-click on a later one: the heatmap adds up the span's
  picks (its data differ from the whole answer's) and the chips between are marked;
- coverage: every document is listed with its share read; a never-read region opens the source viewer at
  that file and those lines;
- compare: the two answers' heatmaps on one colour scale, their difference, the overlap of their picks.

The app runs as its own process (`python launch.py`, tests/live_server.py). A screenshot of each view goes to
artifacts/; with LONGLENS_REFRESH=1 (`bash scripts/refresh_results.sh views`) also to assets/screenshots/,
the README's pictures: a test run writes no tracked file.
"""

import json
import os
import re
import shutil

import pytest

from helpers import ASSETS, REPO, SHIPPED

ARTIFACTS = REPO / "artifacts"
SCREENSHOTS = ASSETS / "screenshots"
EXAMPLES = ASSETS / "examples"
QUESTIONS = ("What is the access code for the misty lighthouse?", "What is the access code for the quiet harbour?")

pytestmark = [pytest.mark.browser,  # chromium missing: a failure under CI, a skip elsewhere (conftest.py)
              pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no model in assets/model")]

# a plot's first trace as the page holds it (null until plotly drew it)
TRACE = """(sel) => { const gd = document.querySelector(sel + ' .js-plotly-plot');
    if (!gd || !gd.data || !gd.data.length) return null;
    const t = gd.data[0];
    return { type: t.type, z: t.z ? JSON.stringify(t.z) : null, zmax: t.zmax ?? null, n: gd.data.length,
             title: (gd.layout.title && gd.layout.title.text) || '' }; }"""


def almanac(path, lines: int = 320):
    """A long document no question is about."""
    winds = ("north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west")
    rows = [f"Day {i}: high water at {(5 + 7 * i) % 24:02d}:{(13 * i) % 60:02d}, wind from the {winds[i % 8]}, "
            f"{(3 * i) % 11 + 1} boats out and {(i * 29) % 97} crates of fish landed." for i in range(1, lines + 1)]
    path.write_text("# Harbour almanac\n\n" + "\n".join(rows) + "\n")
    return path


def trace(page, selector: str):
    return page.evaluate(TRACE, selector)


def wait_heatmap(page, selector: str, title: str = "") -> dict:
    page.wait_for_function("([sel, title]) => { const gd = document.querySelector(sel + ' .js-plotly-plot');"
                           " return gd && gd.data && gd.data.length && gd.data[0].type === 'heatmap'"
                           " && gd.layout.title && gd.layout.title.text.includes(title); }",
                           arg=[selector, title], timeout=30_000)
    return trace(page, selector)


VIEWS = ("token-span", "coverage", "compare")  # the screenshots, one per view


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#ll-inspector").screenshot(path=str(ARTIFACTS / f"{name}.png"))


def ask(page, question: str, turn: int) -> None:
    page.fill("#ll-question textarea", question)
    page.click("#ll-ask")
    # the inspector refreshes once the answer is done: its viewer opens the answer's top source
    page.wait_for_function("(t) => ((document.querySelector('#ll-viewer .ll-viewer-head') || {}).innerText || '')"
                           ".includes(`of answer ${t}`)", arg=turn, timeout=60_000)


def test_token_span_coverage_compare(shipped_server, browser, tmp_path):
    files = [EXAMPLES / n for n in ("lighthouse_log.md", "notes.txt", "tides.csv", "harbor.py")]
    files.append(almanac(tmp_path / "almanac.md"))
    page = browser.new_page(viewport={"width": 1440, "height": 1100})
    page.goto(shipped_server.url)
    page.wait_for_selector("#ll-drop", timeout=30_000)
    page.set_input_files("#ll-drop input[type=file]", [str(p) for p in files])
    page.wait_for_selector("#ll-status .ll-ok, #ll-status .ll-warn", timeout=120_000)
    ask(page, QUESTIONS[0], 1)
    ask(page, QUESTIONS[1], 2)

    # ---- token span: the last answer's tokens are chips; click one, shift-click a later one
    page.locator("#ll-inspector").scroll_into_view_if_needed()
    whole = wait_heatmap(page, "#ll-heatmap")
    n = page.locator("#ll-tokens [data-ll-tok]:not([data-ll-tok=all])").count()
    assert n >= 3, f"the answer has {n} tokens: too few for a span short of the whole answer"
    last = min(n - 2, 3)  # a span that leaves the last token out
    page.locator('#ll-tokens [data-ll-tok="0"]').click()
    one = wait_heatmap(page, "#ll-heatmap", "answer token #0")
    page.locator(f'#ll-tokens [data-ll-tok="{last}"]').click(modifiers=["Shift"])
    span = wait_heatmap(page, "#ll-heatmap", f"answer tokens #0–#{last}")
    assert span["z"] != whole["z"] and span["z"] != one["z"]
    page.wait_for_function("(k) => document.querySelectorAll('#ll-tokens .ll-tok-on').length === k",
                           arg=last + 1, timeout=15_000)
    assert f"#0–#{last}" in page.locator("#ll-focus input").input_value()
    shot(page, "token-span")
    page.locator('#ll-tokens [data-ll-tok="all"]').click()  # back to the whole answer
    assert wait_heatmap(page, "#ll-heatmap", "CSA selection:")["z"] == whole["z"]

    # ---- coverage: every document, its share read; a never-read region opens in the viewer
    page.click("#ll-tab-coverage-button")
    page.wait_for_selector("#ll-coverage table", timeout=15_000)
    table = page.locator("#ll-coverage table").inner_text()
    for p in files:
        assert p.name in table
    assert "2</b> answers" in page.locator("#ll-coverage-summary").inner_html()
    assert re.search(r"\d+(\.\d)?%", page.locator("#ll-coverage-summary").inner_text())
    page.wait_for_function("() => { const gd = document.querySelector('#ll-coverage-strip .js-plotly-plot');"
                           " return gd && gd.data && gd.data.length && gd.data[0].y.length === 3; }", timeout=15_000)
    region = page.locator("#ll-coverage .ll-unread .ll-chip").first
    target = region.get_attribute("data-ll-open")
    m = re.fullmatch(r"file:(.+):(\d+)(?:-(\d+))?", target)
    assert m, target
    name, first, end = m.group(1), m.group(2), m.group(3) or m.group(2)
    assert name in {p.name for p in files}
    region.click()
    page.wait_for_function("([n, a, b]) => { const h = document.querySelector('#ll-viewer .ll-viewer-head');"
                           " return h && h.innerText.includes(n) && h.innerText.includes(`target ${a}–${b}`); }",
                           arg=[name, first, end], timeout=15_000)
    assert page.locator("#ll-viewer .ll-target").count() >= 1  # marked (the viewer shows 160 lines at most)
    shot(page, "coverage")

    # ---- compare: answers 1 and 2 on one colour scale, their difference and overlap
    page.click("#ll-tab-compare-button")
    a = wait_heatmap(page, "#ll-compare-heat-a", "Answer 1")
    b = wait_heatmap(page, "#ll-compare-heat-b", "Answer 2")
    assert a["zmax"] and a["zmax"] == b["zmax"] and a["z"] != b["z"]
    diff = wait_heatmap(page, "#ll-compare-diff", "Difference")
    assert "answer 2 − answer 1" in diff["title"]
    page.wait_for_function("() => { const gd = document.querySelector('#ll-compare-overlap .js-plotly-plot');"
                           " return gd && gd.data && gd.data.length === 3 && gd.data[0].type === 'bar'; }",
                           timeout=15_000)
    overlap = float(page.locator("#ll-compare-summary .ll-overlap-value").inner_text())
    assert 0.0 <= overlap <= 1.0
    assert page.locator("#ll-compare-summary .ll-cmp-col").count() == 2
    assert json.loads(a["z"]) and json.loads(b["z"])
    shot(page, "compare")
    page.close()
    if os.environ.get("LONGLENS_REFRESH"):  # scripts/refresh_results.sh views: the README's pictures
        SCREENSHOTS.mkdir(exist_ok=True)
        for name in VIEWS:
            shutil.copy(ARTIFACTS / f"{name}.png", SCREENSHOTS / f"{name}.png")
