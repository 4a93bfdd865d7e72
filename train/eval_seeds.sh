#!/usr/bin/env bash
# Issue 3's bar for a trained model: single needle (held-out haystacks, depths 0-1) at 4k, 32k and 128k tokens
# over seeds 0, 1 and 2, 20 questions per (length, seed), in two one-thread streams (~20 min on 2 vCPUs):
#
#   bash train/eval_seeds.sh MODEL_DIR OUT_DIR
#
# OUT_DIR gets one-s<S>.jsonl (4k, 32k) and 131k-s<S>.jsonl (--json --examples cells), then a summary.
set -euo pipefail
MODEL=${1:?model folder}
OUT=${2:?output folder}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
[ -f "$MODEL/tokenizer.json" ] || cp assets/tokenizer.json "$MODEL/"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000
ev() {  # seed lengths file
  $PY -m runtime eval niah --lengths "$2" --depths 0,0.25,0.5,0.75,1 --seed "$1" --n 4 --threads 1 --json \
    --examples --model "$MODEL" > "$OUT/$3" 2>> "$OUT/stderr.log"
}
( for s in 0 1 2; do ev $s 4096,32768 one-s$s.jsonl; done; ev 2 131072 131k-s2.jsonl ) &
( ev 0 131072 131k-s0.jsonl; ev 1 131072 131k-s1.jsonl ) &
wait
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
cells = [json.loads(l) for f in sorted(Path(sys.argv[1]).glob("*-s*.jsonl")) for l in open(f) if l.startswith("{")]
bar = {4096: 0.95, 32768: 0.95, 131072: 0.90}
for L in sorted({c["length"] for c in cells}):
    per = {s: [e for c in cells if c["length"] == L and c["seed"] == s for e in c["examples"]] for s in (0, 1, 2)}
    ok = {s: sum(e["ok"] for e in ex) for s, ex in per.items()}
    n = sum(len(ex) for ex in per.values())
    rec = [e["recall"] for ex in per.values() for e in ex if e["recall"] is not None]
    acc = sum(ok.values()) / max(1, n)
    print(f"{L:>7}: " + "  ".join(f"seed {s} {ok[s]}/{len(per[s])}" for s in per)
          + f"  all {acc:.2f} (bar {bar.get(L, 0):.2f}: {'met' if acc >= bar.get(L, 0) else 'NOT met'})"
          + f"  recall {sum(rec) / max(1, len(rec)):.2f}")
EOF
