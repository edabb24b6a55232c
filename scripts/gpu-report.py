#!/usr/bin/env python3
"""Tables of scripts/gpu-check's benchmark JSON (Google Benchmark and bench/peers.py), as Markdown."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
for name in ("bench_decode", "bench_compress", "bench_append", "peers"):
    f = out / f"{name}.json"
    if not f.exists():
        continue
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError:
        print(f"\n### {name}\n\n(incomplete JSON)")
        continue
    print(f"\n### {name}\n")
    if name == "peers":
        print("| peer | shape | time (us) | TB/s |\n| --- | --- | --- | --- |")
        for r in data.get("results", []):
            print(f"| {r['name']} | {r['shape']} | {r['us']:.1f} | {r.get('tbps', 0):.2f} |")
        continue
    print("| benchmark | time (us) | TB/s | copy fraction |\n| --- | --- | --- | --- |")
    for b in data.get("benchmarks", []):
        if b.get("error_occurred"):
            print(f"| {b['name']} | error: {b.get('error_message', '')} | | |")
            continue
        print(f"| {b['name']} | {b['real_time']:.1f} | {b.get('TB/s', 0):.3f} | {b.get('copy_fraction', 0):.2f} |")
