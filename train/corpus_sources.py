"""Moved to runtime/haystacks.py (evaluation reads the held-out split too, and runtime/ imports nothing from
train/). This name stays for old imports; ``python -m runtime.haystacks`` prints the corpus sizes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.haystacks import *  # noqa: E402,F401,F403
from runtime.haystacks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
