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


def sweep(out, binary, benchmark):
    """(fields, result) of each run of `benchmark` in `binary`'s JSON, its name's "key:value"
    parts as fields; nothing where the JSON is missing or incomplete."""
    f = out / f"{binary}.json"
    try:
        data = json.loads(f.read_text()) if f.exists() else {}
    except json.JSONDecodeError:
        return []
    runs = []
    for b in data.get("benchmarks", []):
        parts = b["name"].split("/")
        if parts[0] == benchmark and not b.get("error_occurred"):
            runs.append((dict(p.split(":") for p in parts[1:] if ":" in p), b))
    return runs


def split_table(out):
    """bm_decode_splits per shape: the library's split choice (split:0) beside the fastest
    explicit split, the figures a retune of split_tokens_for starts from."""
    shapes = {}  # "B:8/n:32768/x:1" -> {split: µs}
    for fields, b in sweep(out, "bench_decode", "bm_decode_splits"):
        shape = "/".join(f"{k}:{fields[k]}" for k in ("B", "n", "x"))
        shapes.setdefault(shape, {})[int(fields["split"])] = b["real_time"]
    if not shapes:
        return
    print("\n### Decode split sizes (bm_decode_splits)\n")
    print("| shape | library's choice (us) | fastest split (keys) | its time (us) | fastest / library's |")
    print("| --- | --- | --- | --- | --- |")
    for shape, times in shapes.items():
        explicit = {k: v for k, v in times.items() if k > 0}
        if 0 not in times or not explicit:
            continue
        best = min(explicit, key=explicit.get)
        print(f"| {shape} | {times[0]:.1f} | {best} | {explicit[best]:.1f} | {explicit[best] / times[0]:.3f} |")


def piece_table(out):
    """bm_snapkv_pieces per shape: each piece size's step time and workspace, the trade an
    engine makes with compress_arguments::piece_slots (0: the library's)."""
    runs = sweep(out, "bench_compress", "bm_snapkv_pieces")
    if not runs:
        return
    print("\n### Compression step pieces (bm_snapkv_pieces, tensor cores, bf16 query values)\n")
    print("| shape | piece (slots; 0: the library's) | time (us) | workspace / K+V |")
    print("| --- | --- | --- | --- |")
    for fields, b in runs:
        print(f"| B:{fields['B']}/n:{fields['n']} | {fields['piece']} | {b['real_time']:.1f} | "
              f"{100 * b.get('workspace_fraction', 0):.1f}% |")


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


split_table(out)
piece_table(out)
if (out / "ab").is_dir():
    ab_table(out / "ab")
