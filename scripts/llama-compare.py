#!/usr/bin/env python3
"""llama-compare.py EXPECTED.csv ACTUAL.csv: are two `kvtrim-llama eval --csv` outputs the same run?

scripts/gpu-check feeds it the CPU backend's rows (expected) and the CUDA backend's (actual).
The same rows (protocol, policy, budget) in the same order; kv_bytes and kv_fraction equal (the
same number of tokens kept at every step); nll and ppl within --tolerance relative (default
5e-4: the two backends sum attention in different orders, so the logits differ in the last
bits of fp32); top1_agreement within --top1 absolute (default 0.01: one of the 127 predictions
a prefill window scores). tokens_per_s is not compared. Lines that are not CSV rows (the
"kvtrim-llama eval: ..." line on stderr, if captured) are skipped. Prints every difference;
exit status 1 if there is one, 2 for unreadable input.
"""
import argparse
import csv
import sys

KEY = ("protocol", "policy", "budget")
EXACT = ("kv_bytes", "kv_fraction")
RELATIVE = ("nll", "ppl")


def read_rows(path):
    with open(path, newline="") as f:
        lines = [line for line in f if not line.startswith("kvtrim-llama")]
    rows = list(csv.DictReader(lines))
    needed = set(KEY + EXACT + RELATIVE + ("top1_agreement",))
    if not rows or not needed.issubset(rows[0].keys()):
        raise ValueError(f"{path}: not the CSV of kvtrim-llama eval --csv (columns {sorted(needed)})")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expected")
    parser.add_argument("actual")
    parser.add_argument("--tolerance", type=float, default=5e-4, help="relative, for nll and ppl")
    parser.add_argument("--top1", type=float, default=0.01, help="absolute, for top1_agreement")
    args = parser.parse_args()
    try:
        expected, actual = read_rows(args.expected), read_rows(args.actual)
    except (OSError, ValueError) as e:
        print(f"llama-compare: {e}", file=sys.stderr)
        return 2

    differences = []
    keys_e = [tuple(r[k] for k in KEY) for r in expected]
    keys_a = [tuple(r[k] for k in KEY) for r in actual]
    if keys_e != keys_a:
        missing = [",".join(k) for k in keys_e if k not in keys_a]
        extra = [",".join(k) for k in keys_a if k not in keys_e]
        differences.append(f"rows differ: missing {missing}, unexpected {extra}" if missing or extra
                           else "rows differ: same rows in another order")
    for e, a in zip(expected, actual):
        if tuple(e[k] for k in KEY) != tuple(a[k] for k in KEY):
            continue
        row = ",".join(e[k] for k in KEY)
        for col in EXACT:
            if e[col] != a[col]:
                differences.append(f"{row}: {col} {a[col]}, expected {e[col]}")
        for col in RELATIVE:
            x, y = float(e[col]), float(a[col])
            if abs(y - x) > args.tolerance * abs(x):
                differences.append(f"{row}: {col} {a[col]}, expected {e[col]} (tolerance {args.tolerance:g} relative)")
        x, y = float(e["top1_agreement"]), float(a["top1_agreement"])
        if abs(y - x) > args.top1:
            differences.append(f"{row}: top1_agreement {a['top1_agreement']}, expected {e['top1_agreement']} "
                               f"(tolerance {args.top1:g})")
    for d in differences:
        print(d)
    print(f"llama-compare: {len(expected)} rows, {len(differences)} difference(s)")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
