"""Longlens benchmark harness (issue 6; issue 2's scale lines): `python -m bench --help`.

Each context length runs in a fresh subprocess (so peak RSS is per length) under an address-space
limit (so an overrun is an allocation error, not the OOM killer). The parent measures the machine
(matmul peak of the run's dtype), spawns the workers, prints tables and, with --write-md, renders
BENCHMARKS.md and its plot from the results.

Modules: configs (model presets), machine (machine info, matmul peak, RSS), flops (analytical FLOP
model of the sparse runtime), split (per-layer-type timers), worker (one context length), compare
(transformers / eager reference runs), report (tables, markdown, SVG plot), cli (orchestration).
"""
