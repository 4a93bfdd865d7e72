"""The inspector's Counterfactual, Needles and Export tabs in a real browser (Playwright driving Debian's
chromium, never `playwright install`), the shipped model over the sample corpus (assets/examples):

- counterfactual: the lighthouse question answers 5820417; excluding lighthouse_log.md:22 (the planted
  line) gives another answer, shown next to the old one; running again with nothing excluded gives
  5820417 back;
- needles: a 2 depths x 2 documents grid renders, with its summary;
- export: the HTML report downloads and, opened in a fresh context with networking disabled, draws its
  heatmap; the trace JSON downloads and, uploaded back through "Load a trace", gives the Selection tab's
  heatmap the same data.

The app runs as its own process (tests/live_server.py). A screenshot of each view goes to artifacts/; with
LONGLENS_REFRESH=1 (`bash scripts/refresh_results.sh views`) also to assets/screenshots/.
"""

import json
import os
import shutil

import pytest

from helpers import ASSETS, REPO, SHIPPED

ARTIFACTS = REPO / "artifacts"
SCREENSHOTS = ASSETS / "screenshots"
EXAMPLES = ASSETS / "examples"
QUESTION = "What is the access code for the misty lighthouse?"
VALUE = "5820417"  # assets/examples/lighthouse_log.md:22

pytestmark = [pytest.mark.browser,  # chromium missing: a failure under CI, a skip elsewhere (conftest.py)
              pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no model in assets/model")]

HEAT_Z = """(sel) => { const gd = document.querySelector(sel + ' .js-plotly-plot');
    if (!gd || !gd.data || !gd.data.length || gd.data[0].type !== 'heatmap') return null;
    return JSON.stringify(gd.data[0].z); }"""


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#ll-inspector").screenshot(path=str(ARTIFACTS / f"{name}.png"))
    if os.environ.get("LONGLENS_REFRESH"):  # scripts/refresh_results.sh views: the README's pictures
        SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copy(ARTIFACTS / f"{name}.png", SCREENSHOTS / f"{name}.png")


@pytest.fixture(scope="module")
def page(shipped_server, browser):
    """The sample corpus loaded and the lighthouse question answered."""
    context = browser.new_context(viewport={"width": 1440, "height": 1200}, accept_downloads=True)
    page = context.new_page()
    page.goto(shipped_server.url)
    page.wait_for_selector("#ll-drop", timeout=30_000)
    page.set_input_files("#ll-drop input[type=file]", [str(p) for p in sorted(EXAMPLES.iterdir()) if p.is_file()])
    page.wait_for_selector("#ll-status .ll-ok, #ll-status .ll-warn", timeout=120_000)
    page.fill("#ll-question textarea", QUESTION)
    page.click("#ll-ask")
    page.wait_for_function("() => ((document.querySelector('#ll-viewer .ll-viewer-head') || {}).innerText || '')"
                           ".includes('of answer 1')", timeout=60_000)
    assert VALUE in page.locator("#ll-chat").inner_text()
    yield page
    context.close()


def run_counterfactual(page, exclude: str, badge: str) -> str:
    page.fill("#ll-cf-exclude textarea", exclude)
    page.click("#ll-cf-run")
    page.wait_for_selector(f"#ll-cf-result {badge}", timeout=60_000)
    return page.locator("#ll-cf-result .ll-cf-new .ll-cf-text").inner_text().strip()


def test_counterfactual_excludes_the_needle_and_restores_it(page):
    page.click("#ll-tab-counterfactual-button")
    page.click("#ll-cf-exclude-this")  # the viewer shows the answer's top source: it becomes a spec
    page.wait_for_function("() => document.querySelector('#ll-cf-exclude textarea').value.length > 0",
                           timeout=15_000)
    new = run_counterfactual(page, "lighthouse_log.md:22", ".ll-cf-changed")
    old = page.locator("#ll-cf-result .ll-cf-old .ll-cf-text").inner_text().strip()
    assert VALUE in old and VALUE not in new, (old, new)
    assert "sliding window and the HCA entries" in page.locator("#ll-cf-result").inner_text()
    assert page.locator("#ll-cf-result table.ll-cf-selection tr").count() > 1
    assert "lighthouse_log.md:22" in page.locator("#ll-cf-result table.ll-cf-spans").inner_text()
    page.wait_for_function("() => { const gd = document.querySelector('#ll-cf-heat-new .js-plotly-plot');"
                           " return gd && gd.data && gd.data.length && gd.data[0].type === 'heatmap'; }",
                           timeout=15_000)
    shot(page, "counterfactual")
    assert VALUE in run_counterfactual(page, "", ".ll-cf-same")  # nothing excluded: the planted value again


def test_export_report_offline_and_trace_roundtrip(page, browser, tmp_path):
    page.click("#ll-tab-selection-button")
    page.wait_for_function(f"() => ({HEAT_Z})('#ll-heatmap') !== null", timeout=15_000)
    before = page.evaluate(HEAT_Z, "#ll-heatmap")
    page.click("#ll-tab-export-button")

    def download(button: str, name: str):
        page.click(button)
        link = page.locator(f'#ll-export-file a[download="{name}"]').first
        link.wait_for(timeout=60_000)
        with page.expect_download() as d:
            link.click()
        path = tmp_path / name
        d.value.save_as(str(path))
        return path

    report = download("#ll-export-report", "longlens-report.html")
    assert "<script src=" not in report.read_text()
    offline = browser.new_context(offline=True)
    offline.route("**/*", lambda r: r.abort() if r.request.url.startswith("http") else r.continue_())
    view = offline.new_page()
    view.goto(report.as_uri())
    view.wait_for_function("() => { const gd = document.getElementById('fig-csa-selection');"
                           " return gd && gd.data && gd.data[0].type === 'heatmap'"
                           " && gd.querySelector('.main-svg'); }", timeout=30_000)
    assert QUESTION in view.locator("body").inner_text()
    offline.close()

    trace = download("#ll-export-trace", "longlens-trace.json")
    assert json.loads(trace.read_text())["format"].startswith("longlens-trace")
    page.set_input_files("#ll-trace-upload input[type=file]", str(trace))
    page.wait_for_function("() => ((document.querySelector('#ll-export-status') || {}).innerText || '')"
                           ".includes('loaded Longlens trace')", timeout=30_000)
    shot(page, "export")
    page.click("#ll-tab-selection-button")
    page.wait_for_function(f"() => ({HEAT_Z})('#ll-heatmap') !== null", timeout=15_000)
    assert page.evaluate(HEAT_Z, "#ll-heatmap") == before


def test_needles_grid(page):
    page.click("#ll-tab-needles-button")
    page.locator("#ll-needle-depths label", has_text="0.5").click()  # the defaults 0, 0.5, 1 -> 0, 1
    box = page.locator("#ll-needle-docs input")
    for name in ("lighthouse_log.md", "notes.txt"):
        box.fill(name)
        box.press("Enter")
    page.click("#ll-needle-run")
    page.wait_for_selector("#ll-needles table.ll-needle-grid", timeout=90_000)
    assert page.locator("#ll-needles td.ll-needle").count() == 4
    grid = page.locator("#ll-needles").inner_text()
    assert "lighthouse_log.md" in grid and "notes.txt" in grid and "depth 0" in grid and "depth 1" in grid
    assert page.locator("#ll-needles .ll-needle-summary p").count() >= 1
    shot(page, "needles")
