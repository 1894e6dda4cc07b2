#!/usr/bin/env python
"""Sequence-parallel attention: bytes each rank sends per layer, and wall time on this machine.

Bytes: a local layer (halo exchange: the ``window - 1`` keys and values before each slice)
against a global layer (every earlier slice), counted from the exchange plans for long
sequences, and checked against the bytes actually sent by real runs on the sizes that fit.
Wall time: one layer's forward and backward split over 1, 2 and 4 processes (gloo on
loopback). This machine has 2 cores: more processes than cores measure overhead, not speed-up.

    python benchmarks/distributed.py
    swattn bench distributed [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swattn import distributed as sd


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cell, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, cell["threads"] // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    n, h, hkv, d = cell["n"], cell["heads"], cell["heads_kv"], cell["head_dim"]
    local = n // world + (1 if rank < n % world else 0)
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(1, h, local, d, generator=gen, requires_grad=True)
    k = torch.randn(1, hkv, local, d, generator=gen, requires_grad=True)
    v = torch.randn(1, hkv, local, d, generator=gen, requires_grad=True)

    def step():
        out = sd.sliding_window_attention(q, k, v, cell["window"]) if world > 1 else \
            __import__("swattn").sliding_window_attention(q, k, v, cell["window"])
        out.sum().backward()

    step()  # warm-up (kernel build, connections)
    dist.barrier()
    sd.bytes_sent(reset=True)
    start = time.perf_counter()
    step()
    dist.barrier()
    seconds = time.perf_counter() - start
    results.put((rank, seconds, sd.bytes_sent()))
    dist.destroy_process_group()


def measure(world: int, cell: dict) -> tuple[float, list[int]]:
    """One forward+backward of a layer over ``world`` processes: (seconds, bytes sent per rank).

    Runs this file as a script in a fresh Python (its processes are spawned from there, where
    their target can be found by name), whatever imported this module.
    """
    import json
    import subprocess

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", json.dumps([world, cell])],
                          capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            seconds, sent = json.loads(line[len("RESULT "):])
            return seconds, sent
    raise RuntimeError(f"the measurement failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")


def _spawn(world: int, cell: dict) -> tuple[float, list[int]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cell, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=1200) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    return max(g[1] for g in got), [g[2] for g in got]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swattn bench distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n=16384 for the measured part")
    parser.add_argument("--n", type=int, default=65536, help="tokens of the measured runs")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        import json

        print("RESULT " + json.dumps(_spawn(*json.loads(args.measure))), flush=True)
        return 0
    if args.quick:
        args.n = 16384
    h, hkv, d, w = 8, 4, 128, args.window
    sizes = sd.TokenBytes.of(h, hkv, d, 4)
    print(f"# one layer: {h} query / {hkv} kv heads, head_dim {d}, fp32; local window {w}; forward bytes sent by the "
          "busiest rank (computed from the exchange plans)")
    print(f"{'n':>9} {'ranks':>5} | {'local layer (halo)':>19} | {'ring attention':>15} | {'ring / halo':>11} | "
          f"{'swattn global layer':>19}")
    for n in (65536, 262144, 1 << 20):
        for ranks in (2, 4, 8):
            lengths = [n // ranks] * ranks
            halo = max(sd.traffic(lengths, w, r, sizes)[0] for r in range(ranks))
            ring = sd.ring_attention_bytes(lengths, sizes)
            glob = max(sd.traffic(lengths, None, r, sizes)[0] for r in range(ranks))
            print(f"{n:>9,} {ranks:>5} | {halo / 1e6:>16.1f} MB | {ring / 1e6:>12.1f} MB | {ring / halo:>10.0f}x | "
                  f"{glob / 1e6:>16.1f} MB")
    print(f"\n# measured: forward+backward of one local layer (window {w}) and one global layer, n={args.n:,}, "
          f"{os.cpu_count()} cores shared by all processes")
    print(f"{'layer':>7} {'procs':>5} | {'time':>8} | {'bytes sent by each rank, fwd+bwd: measured':<44} | computed")
    for window in (w, None):
        for world in args.procs:
            cell = dict(n=args.n, heads=h, heads_kv=hkv, head_dim=d, window=window, threads=torch.get_num_threads())
            seconds, sent = measure(world, cell)
            lengths = [args.n // world + (1 if r < args.n % world else 0) for r in range(world)]
            computed = [sum(sd.traffic(lengths, window, r, sizes)) if world > 1 else 0 for r in range(world)]
            print(f"{'local' if window else 'global':>7} {world:>5} | {seconds:>6.2f} s | "
                  f"{', '.join(f'{b / 1e6:.1f} MB' for b in sent):<44} | "
                  f"{', '.join(f'{b / 1e6:.1f} MB' for b in computed)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
