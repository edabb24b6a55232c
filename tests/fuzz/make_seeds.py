#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_cache_ops.cpp (tests/fuzz/corpus/). Each seed spells out,
byte by byte, a short engine session in the decoder's format, so the fuzzer starts from inputs
that reach every operation. Any byte string is a valid input: a seed that drifts out of step
with the decoder still runs, it only does something else. Run: python3 tests/fuzz/make_seeds.py"""
import os

NO = 200  # a byte that says "no" to every chance() and picks the first live sequence rarely


def config(mode, layers=2, kv=2, group=2, dim_index=4, block=4, blocks=32, seqs=2, tokens=40):
    # mode: 0 fp32, 1 fp16, 2 bf16 with static head dim 4, 3 device fp16, 4 pool only
    # dims = {1, 2, 4, 6, 8, 3}; ranges are 1 + byte % n
    return [mode, layers - 1, kv - 1, group - 1, dim_index, block - 1, blocks - 1, seqs - 1, tokens - 1, 255]


def add(id_index=0):  # ids[12] = {0, 1, 2, 3, 4, 5, ...}
    return [0, 204 + id_index]


def append(tokens, seed, live=0):
    return [3, live, NO, tokens - 1, 0, seed, NO, seed + 1, NO, NO]


def append_layer(layer, tokens, seed, live=0):
    return [5, live, layer, NO, tokens - 1, 0, seed, NO, seed + 1, NO, NO]


def append_batch(picks, layer, tokens, seed):
    # picks: sequence choices (0 = first live); each continues from its own next position
    return [4 + 240, len(picks)] + picks + [layer + 1, NO, tokens - 1] + [0] * len(picks) + [NO, seed, NO, seed + 1, NO, NO]


def policy_tail(rows, seed, by_layer=False, layer=0):
    out = [0, NO, NO, 0 if by_layer else NO]
    if by_layer:
        out.append(layer)
    return out + [rows, NO, seed, NO, NO]


def snapkv(budget, window, rows, seed):
    return [6, 2, 0, budget, window, 1, 3, NO, 0, NO, NO] + policy_tail(rows, seed)


def h2o(budget, recent, rows, seed):
    return [7, 1, 0, budget, recent, NO, 0, 0, NO, NO] + policy_tail(rows, seed)


def streaming(budget, sinks):
    return [8, 0, 0, budget, sinks, NO, NO, NO] + policy_tail(0, 1)


def pyramidkv(budget, window, rows, seed, by_layer=False):
    return [6, 3, 0, budget, window, 19, NO, 1, 3, NO, 0, NO, NO] + policy_tail(rows, seed, by_layer)


def ada_kv(budget, window, rows, seed):
    return [7, 4, 0, budget, window, 25, NO, 0, 1, 3, NO, 0, NO, NO] + policy_tail(rows, seed)


def kv_compress(budget, window, rows, seed):
    return [8, 6, 0, 0, budget, window, 0, 3, 0, NO, NO] + policy_tail(rows, seed)


def attend(layer, acc, seed):
    return [10, 0, layer, NO, acc, 0, seed, NO, NO, NO]


def apply_keep_half():
    return [9, 0, NO, 128] + [0, 255] * 40 + [NO] * 8


def rerotate():
    return [14, 0, 0, NO]


def truncate(picks, lengths):
    # picks: sequence choices (0 = first live); lengths: a byte per head of each pick, in
    # order, each giving 1 + byte % the head's length
    return [15, len(picks)] + picks + [b for raw in lengths for b in (raw, NO)] + [NO]


def free(id_index=0):
    return [2, 204 + id_index]


SEEDS = {
    "fp32_snapkv_decode": config(0) + add() + append(12, 3) + snapkv(8, 2, 4, 5) + attend(0, 2, 7) + append(1, 9)
    + attend(1, 1, 8) + free(),
    "fp32_h2o_every_step": config(0) + add() + add(1) + append(10, 3) + append(10, 4, live=1) + h2o(6, 2, 4, 2)
    + attend(0, 1, 3) + append(1, 5) + h2o(6, 2, 0, 1) + apply_keep_half() + free(1),
    "fp16_streaming_pyramid": config(1, layers=3, kv=1, group=3, dim_index=2) + add() + append(16, 1)
    + streaming(9, 2) + append_layer(1, 3, 4) + pyramidkv(10, 2, 3, 6, by_layer=True) + rerotate(),
    "bf16_static_dim_ada_kv": config(2, kv=3, group=1, dim_index=2, block=2) + add(2) + append(14, 2)
    + ada_kv(8, 2, 4, 9) + attend(1, 2, 1) + free(2),
    "device_fp16_kv_compress": config(3, block=4, blocks=48) + add() + append(20, 7) + kv_compress(8, 5, 4, 3)
    + append(2, 8) + apply_keep_half(),
    "device_fp16_truncate": config(3, block=4, blocks=48) + add() + add(1) + append(12, 3) + append(10, 4, live=1)
    + truncate([0, 1], [4, 11, 0, 7, 2, 9, 1, 5]) + truncate([1, 1], [0] * 8) + append(3, 5) + free(),
    "device_fp16_batch_decode": config(3, block=4, blocks=48) + add() + add(1) + append(6, 3)
    + append(9, 4, live=1) + append_batch([0, 1], 0, 1, 5) + append_batch([0, 1], 1, 1, 6)
    + append_batch([1, 1], 0, 1, 7) + truncate([0, 1], [2, 5, 1, 3, 4, 2, 6, 1]) + append_batch([1, 0], 1, 2, 8),
    "pool_exhaustion": config(0, block=1, blocks=8, tokens=16) + add() + add(1) + append(3, 1) + append(6, 2, live=1)
    + append(1, 3) + free() + append(4, 4),
    "pool_exhaustion_batch": config(0, layers=1, kv=1, block=1, blocks=8, tokens=16) + add() + add(1)
    + append(3, 1) + append(2, 2, live=1) + append_batch([0, 1], 0, 2, 3) + append_batch([0, 1], 0, 1, 4),
    "pool_only": [4, 20] + [0, 5, 0, 3, 255, 2, 0, 1, 255, 1, 255, 2, 9, 9, 0, 12],
    "invalid_config": [0, 1, 1, 1, 4, 3, 31, 1, 39, 0, 0, 0],
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(bytes(b % 256 for b in data))
    print(f"wrote {len(SEEDS)} seeds to {out}")
