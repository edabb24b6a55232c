#!/usr/bin/env python3
"""PyTorch peers of the kvtrim GPU benchmarks, timed in the same run on the same GPU.

Llama-3-8B layer shape (32 query / 8 KV heads, head dim 128, bf16):
  * SDPA decode on the dense full cache (n) and on a dense cache of the compressed size (n / x)
  * flash-attention varlen over per-head lengths (torch.ops.aten._flash_attention_forward),
    each KV head its own "sequence" with its G queries (Ada-KV's layout)
  * a lean PyTorch SnapKV compression step (window 32, max pool 7, C = n / 16, GQA mean)
CUDA-event medians, eager and CUDA-graph replay. Writes JSON (--out).
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
DT = torch.bfloat16


def timed(fn, iters=50, graph=False):
    """Median milliseconds of fn() over `iters` runs (CUDA events)."""
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            fn()
        run = g.replay
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def copy_tbps():
    a = torch.empty(1 << 29, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), iters=20)
    return 2 * a.numel() * 2 / (ms / 1e3) / 1e12


def sdpa_decode(batch, n):
    q = torch.randn(batch, HQ, 1, D, dtype=DT, device="cuda")
    k = torch.randn(batch, HKV, n, D, dtype=DT, device="cuda")
    v = torch.randn_like(k)
    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return fn, 2 * k.numel() * 2


def flash_varlen(batch, mean_len):
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(mean_len // 2, mean_len * 3 // 2 + 1, (batch * HKV,), generator=gen)
    total = int(lens.sum())
    cu_k = torch.zeros(batch * HKV + 1, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(lens, 0)
    cu_q = torch.arange(0, batch * HKV + 1, dtype=torch.int32) * 1
    q = torch.randn(batch * HKV, G, D, dtype=DT, device="cuda")  # each KV head: one sequence, G queries (MQA)
    k = torch.randn(total, 1, D, dtype=DT, device="cuda")
    v = torch.randn_like(k)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    max_k = int(lens.max())

    def fn():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, max_k, 0.0, False, False)

    return fn, 2 * k.numel() * 2


def snapkv_step(batch, n, window=32, kernel=7):
    budget = n // 16
    q = torch.randn(batch, HQ, window, D, dtype=DT, device="cuda")
    k = torch.randn(batch, HKV, n, D, dtype=DT, device="cuda")
    v = torch.randn_like(k)
    mask = torch.full((window, window), float("-inf"), device="cuda").triu(1)

    def fn():
        qg = q.view(batch, HKV, G * window, D)  # GQA without repeating K
        logits = torch.matmul(qg, k.transpose(-1, -2)).float() / math.sqrt(D)
        logits = logits.view(batch, HKV, G, window, n)
        logits[..., n - window:] += mask
        p = logits.softmax(-1)
        vote = p[..., : n - window].sum(-2).mean(2)  # window sum, GQA mean
        pooled = F.max_pool1d(vote.view(batch * HKV, 1, -1), kernel, 1, kernel // 2).view(batch, HKV, -1)
        idx = pooled.topk(budget - window, dim=-1).indices
        idx = idx.unsqueeze(-1).expand(-1, -1, -1, D)
        kk = torch.cat([k[:, :, : n - window].gather(2, idx), k[:, :, n - window:]], 2)
        vv = torch.cat([v[:, :, : n - window].gather(2, idx), v[:, :, n - window:]], 2)
        return kk, vv

    return fn, k.numel() * 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="peers.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    copy = copy_tbps()

    def add(name, shape, make, graph):
        try:
            fn, nbytes = make()
            ms = timed(fn, graph=graph)
            results.append({"name": name + (" graph" if graph else ""), "shape": shape, "us": ms * 1e3,
                            "tbps": nbytes / (ms / 1e3) / 1e12, "copy_fraction": nbytes / (ms / 1e3) / 1e12 / copy})
        except Exception as e:  # a peer missing on this PyTorch is reported, not fatal
            results.append({"name": name, "shape": shape, "us": float("nan"), "tbps": 0.0, "error": str(e)})
        torch.cuda.empty_cache()

    batches = [1, 8] if args.quick else [1, 8, 32]
    lengths = [4096, 32768] if args.quick else [4096, 32768, 131072]
    for b in batches:
        for n in lengths:
            for x in (1, 4, 8, 16):
                if b * n // x > 32 * 131072 // 1:
                    continue
                for graph in (False, True):
                    add("sdpa decode dense", f"B={b} n={n // x} (n={n}, {x}x)", lambda: sdpa_decode(b, n // x), graph)
            for x in (4, 8, 16):
                add("flash varlen decode", f"B={b} mean={n // x}", lambda: flash_varlen(b, n // x), True)
    for b in (1, 8):
        for n in lengths:
            add("pytorch snapkv step", f"B={b} n={n} C={n // 16}", lambda: snapkv_step(b, n), False)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_tbps": copy, "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for r in results:
        print(f"{r['name']:28s} {r['shape']:32s} {r['us']:10.1f} us {r['tbps']:6.2f} TB/s")


if __name__ == "__main__":
    main()
