#!/usr/bin/env bash
# Set up the venv (pinned, CPU torch) and start the app. The README's run command.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
log=$(mktemp)
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt >"$log" 2>&1 || { grep -v "is ignored" "$log"; exit 1; }
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python launch.py "$@"
