#!/usr/bin/env python3
"""Tables of scripts/gpu-check's benchmark JSON (Google Benchmark and bench/peers.py), as Markdown,
and of its baseline A/B (scripts/gpu-ab) where there is one."""
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


def ab_table(ab):
    """Per benchmark, each round's time on the baseline and current side and the ratio of the
    two sides' best rounds (below 1: the current tree is faster)."""
    times = {}  # name -> side -> [µs per round]
    for f in sorted(ab.glob("*-*-*.json")):
        side = f.name.split("-", 1)[0]
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        for b in data.get("benchmarks", []):
            if not b.get("error_occurred"):
                times.setdefault(b["name"], {}).setdefault(side, []).append(b["real_time"])
    commit = ab / "baseline-commit"
    print(f"\n### A/B against the baseline {commit.read_text().strip() if commit.exists() else ''}\n")
    print("| benchmark | baseline (us, per round) | current (us, per round) | current / baseline |")
    print("| --- | --- | --- | --- |")
    for name, sides in times.items():
        base, cur = sides.get("baseline", []), sides.get("current", [])
        ratio = f"{min(cur) / min(base):.3f}" if base and cur else ""
        rounds = lambda ts: ", ".join(f"{t:.1f}" for t in ts) or "—"
        print(f"| {name} | {rounds(base)} | {rounds(cur)} | {ratio} |")


if (out / "ab").is_dir():
    ab_table(out / "ab")
