#!/usr/bin/env bash
# Refresh the tracked files that tests measure but never write on a plain run (`bash scripts/test.sh`
# leaves the tree as it was). Each is written only after its test passed:
#   screenshot  assets/screenshot.png, the README's picture: the shipped model in Debian's chromium
#               (tests/test_browser.py::test_drop_ask_inspect)
#   views       assets/screenshots/{token-span,coverage,compare,counterfactual,needles,export}.png, the README's
#               pictures of the inspector's views, likewise (tests/test_browser_analysis.py::
#               test_token_span_coverage_compare, tests/test_browser_views.py)
#   load        bench/results/load.json: 8 concurrent sessions against `python launch.py`, three waves
#               (tests/test_load.py::test_eight_concurrent_sessions; BENCHMARKS.md, "Load test")
# Usage: bash scripts/refresh_results.sh [screenshot] [views] [load]      (all when none is named)
set -euo pipefail
cd "$(dirname "$0")/.."
what=("$@")
[ ${#what[@]} -gt 0 ] || what=(screenshot views load)
tests=()
for w in "${what[@]}"; do
    case "$w" in
        screenshot)
            # the test skips without chromium; here that would refresh nothing and still succeed
            [ -x /usr/bin/chromium ] || { echo "screenshot needs /usr/bin/chromium (apt-get install -y chromium)" >&2; exit 1; }
            tests+=(tests/test_browser.py::test_drop_ask_inspect) ;;
        views)
            [ -x /usr/bin/chromium ] || { echo "views needs /usr/bin/chromium (apt-get install -y chromium)" >&2; exit 1; }
            tests+=(tests/test_browser_analysis.py::test_token_span_coverage_compare tests/test_browser_views.py) ;;
        load) tests+=(tests/test_load.py::test_eight_concurrent_sessions) ;;
        *) echo "unknown: $w (screenshot, views, load)" >&2; exit 2 ;;
    esac
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False OMP_NUM_THREADS=1 LONGLENS_REFRESH=1
exec .venv/bin/python -m pytest -q "${tests[@]}"
