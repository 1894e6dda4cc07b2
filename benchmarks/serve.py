"""Serving under load: `swattn serve` against a peer OpenAI-compatible server, same requests, same run.

    swattn bench serve --quick                      # about 3 minutes: concurrency 1, 4, 8
    swattn bench serve --peer-url http://127.0.0.1:8080   # also load a running llama-server

Starts `swattn serve` on the two-layer Gemma 2 2b-shaped benchmark model (`swattn bench
model`'s, plus a byte-level tokenizer) and sends streaming /v1/completions requests of fixed
prompt and output lengths (token-id prompts, `ignore_eos`), at most C in flight. Reported as
vLLM's serving benchmark defines them: time to first token (TTFT), inter-token latency (ITL,
between streamed chunks), time per output token (TPOT, (end - first) / (tokens - 1)), output
tokens/s and requests/s over the whole run. Scenarios: `load` (the concurrency sweep),
`interference` (4 streams decoding while a long prompt arrives: their ITL before and during),
`prefix` (TTFT of a request whose long prefix is cached against a cold one), `cancel` (many
requests, a fifth closed mid-stream: completions, usage and resident memory afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import _checkpoint  # noqa: E402  (the same random model as `swattn bench model`)


def _with_tokenizer(path: str) -> str:
    """The server streams text, so the benchmark model needs a tokenizer: a byte-level BPE of its vocabulary."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        from swattn.training.data import expand, read_documents, train_tokenizer

        docs = read_documents(expand(["stdlib"])[:200])
        vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
        train_tokenizer(docs, vocab).save(file)
    return path


def start_swattn(path: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "swattn.cli", "serve", "--model", path, "--port", "0", "--dtype", args.dtype,
           "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size), "--name", "bench",
           "--max-queue", "4096", *args.serve_option]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = None
    deadline = time.monotonic() + 300
    while url is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("swattn serve did not start: " + (proc.stderr.read() or ""))
        found = re.search(r"listening on (http://\S+) ", proc.stderr.readline())
        url = found.group(1) if found else None
    while httpx.get(url + "/health").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the model did not load")
        time.sleep(0.2)
    import threading

    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, url


@functools.cache
def served_model(url: str) -> str:
    """The model name a server answers to (its first in /v1/models): a server started by hand
    (``--url``) serves its directory's name, not the "bench" this script gives its own."""
    models = httpx.get(url + "/v1/models").json().get("data") or [{"id": "bench"}]
    return models[0]["id"]


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                      cancel_after: int | None = None) -> dict:
    """Streams one completion; gives its timings (and usage)."""
    body = {"model": served_model(url), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        return await _stream(client, url, body, cancel_after)
    except httpx.HTTPError as exc:  # counted as an error of this request, not the end of the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}


async def _stream(client: httpx.AsyncClient, url: str, body: dict, cancel_after: int | None) -> dict:
    start = time.perf_counter()
    arrivals, usage, chunks = [], None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    return {"cancelled": True}
            if data.get("usage"):
                usage = data["usage"]
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    return {"start": start, "end": end, "ttft": arrivals[0] - start if arrivals else float("nan"),
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens, "usage": usage,
            "tpot": (end - arrivals[0]) / (tokens - 1) if arrivals and tokens > 1 else float("nan")}


async def run_load(url: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with _client() as client:
        async def bounded(p):
            async with limit:
                return await one_request(client, url, p, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise RuntimeError(f"every request failed: {results[0]['error']}")
    out_tokens = sum(r["tokens"] for r in ok)
    itl = [x for r in ok for x in r["itl"]]
    return {"requests": len(ok), "errors": len(results) - len(ok), "wall": wall, "tok_s": out_tokens / wall,
            "req_s": len(ok) / wall, "ttft": [r["ttft"] for r in ok], "itl": itl, "tpot": [r["tpot"] for r in ok]}


def _client() -> httpx.AsyncClient:
    # a connection per request: a server closing an idle keep-alive connection (llama-server does)
    # must not fail the next request sent on it
    return httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_keepalive_connections=0))


def pct(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


RUN_SEED = random.SystemRandom().randrange(1 << 30)  # fresh prompts every run: no server's cache from an earlier run


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(RUN_SEED + seed)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(n)]


def row(name: str, r: dict) -> str:
    ms = lambda v: f"{1000 * v:7.1f}"  # noqa: E731
    return (f"{name:>18} | {r['requests']:>4} {r['tok_s']:>8.1f} {r['req_s']:>7.2f} | {ms(pct(r['ttft'], 50))} "
            f"{ms(pct(r['ttft'], 99))} | {ms(pct(r['itl'], 50))} {ms(pct(r['itl'], 99))} | "
            f"{ms(pct(r['tpot'], 50))} {ms(pct(r['tpot'], 99))}")


def scenario_load(urls: dict, args, vocab: int) -> None:
    print(f"# load: {args.prompt_len}-token prompts, {args.output_len} new tokens; latencies in ms (p50 p99)")
    print(f"{'server @ conc.':>18} | {'reqs':>4} {'out tok/s':>8} {'req/s':>7} | {'TTFT':>15} | {'ITL':>15} | "
          f"{'TPOT':>15} | decode tok/s (conc. / ITL p50)")
    for c in args.concurrency:
        prompts = random_prompts(max(args.requests_per_level, c), args.prompt_len, vocab, seed=c)
        figures = {}
        for name, url in urls.items():
            asyncio.run(run_load(url, prompts[:1], 4, 1))  # warm-up
            figures[name] = asyncio.run(run_load(url, prompts, args.output_len, c))
            print(row(f"{name} @ {c}", figures[name]) + f" | {c / pct(figures[name]['itl'], 50):8.1f}", flush=True)
        if len(figures) > 1:
            peer = [n for n in figures if n != "swattn"][0]
            print(f"{'':>18}   swattn / {peer} output tokens/s: {figures['swattn']['tok_s'] / figures[peer]['tok_s']:.2f}x")


def scenario_interference(url: str, args, vocab: int) -> None:
    async def go():
        async with _client() as client:
            # streams long enough to outlast the settling and the long prompt's prefill
            streams = [asyncio.create_task(one_request(client, url, p, args.output_len * 16))
                       for p in random_prompts(4, args.prompt_len, vocab, seed=7)]
            await asyncio.sleep(args.settle)
            arrive = time.perf_counter()
            long_req = await one_request(client, url, random_prompts(1, args.long_len, vocab, seed=8)[0], 8)
            done = time.perf_counter()
            results = await asyncio.gather(*streams)
            return results, long_req, arrive, done

    results, long_req, arrive, done = asyncio.run(go())
    before, during = [], []
    decoding = max(r["start"] + r["ttft"] for r in results)  # every stream past its own prefill
    for r in results:
        times = [r["start"] + r["ttft"]]
        for gap in r["itl"]:
            times.append(times[-1] + gap)
        for t0, gap in zip(times, r["itl"]):
            (during if arrive <= t0 < done else before if decoding <= t0 < arrive else []).append(gap)
    p99_before, p99_during = pct(before, 99), pct(during, 99)
    print(f"# interference: 4 streams decoding; a {args.long_len}-token prompt arrives (its TTFT "
          f"{long_req['ttft']:.2f} s)")
    print(f"  the streams' ITL p99: {1000 * p99_before:.1f} ms before, {1000 * p99_during:.1f} ms while it is "
          f"prefilled ({p99_during / p99_before:.2f}x; target <= 3x); p50 {1000 * pct(before, 50):.1f} and "
          f"{1000 * pct(during, 50):.1f} ms, max {1000 * max(before, default=float('nan')):.1f} and "
          f"{1000 * max(during, default=float('nan')):.1f} ms, {len(during)} gaps during")


def scenario_prefix(url: str, args, vocab: int) -> None:
    shared = random_prompts(1, args.prefix_len, vocab, seed=11)[0]

    async def ttft(prompt):
        async with _client() as client:
            return await one_request(client, url, prompt, 4)

    cold = asyncio.run(ttft(shared + random_prompts(1, 16, vocab, seed=12)[0]))
    warm = asyncio.run(ttft(shared + random_prompts(1, 16, vocab, seed=13)[0]))
    cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    print(f"# prefix: {args.prefix_len}-token shared prefix + 16 tokens: TTFT cold {1000 * cold['ttft']:.0f} ms, "
          f"with {cached} tokens cached {1000 * warm['ttft']:.0f} ms ({warm['ttft'] / cold['ttft']:.1%} of cold; "
          "target <= 10%)")


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        return 0


def scenario_cancel(url: str, pid: int, args, vocab: int) -> None:
    prompts = random_prompts(args.cancel_requests, 64, vocab, seed=21)

    async def go(batch):
        limit = asyncio.Semaphore(16)
        async with _client() as client:
            async def bounded(i, p):
                async with limit:
                    return await one_request(client, url, p, 24, cancel_after=4 if i % 5 == 0 else None)

            return await asyncio.gather(*(bounded(i, p) for i, p in enumerate(batch)))

    def gauge(name: str) -> float:
        return float(re.search(rf"^{name} (\S+)$", httpx.get(url + "/metrics").text, re.M).group(1))

    asyncio.run(go(prompts[:50]))  # warm-up
    before, store_before = rss_of(pid), gauge("swattn_prefix_cache_bytes")
    results = asyncio.run(go(prompts))
    time.sleep(1.0)
    after, store_after = rss_of(pid), gauge("swattn_prefix_cache_bytes")
    completed = [r for r in results if "tokens" in r]
    good = sum(r["tokens"] == 24 and r["usage"]["completion_tokens"] == 24 for r in completed)
    running = gauge("swattn_requests_running")
    # every prompt's end is saved for reuse, so the prefix cache grows up to its budget
    # (--prefix-cache-mb): memory held by design, shown apart from what a leak would be
    net_before, net_after = before - store_before, after - store_after
    print(f"# cancel: {len(results)} requests, {len(results) - len(completed)} closed mid-stream; "
          f"{good}/{len(completed)} others complete with correct usage; slots busy afterwards: {running:.0f}; "
          f"resident memory {after / 2**20:.0f} MB after vs {before / 2**20:.0f} MB after warm-up, of which the "
          f"prefix cache {store_after / 2**20:.0f} and {store_before / 2**20:.0f} MB; the rest "
          f"{net_after / max(net_before, 1):.3f}x (target <= 1.05x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swattn bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1 4 8, 8 requests each, load only")
    parser.add_argument("--scenario", nargs="+", default=["load", "interference", "prefix", "cancel"],
                        choices=["load", "interference", "prefix", "cancel"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests-per-level", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--long-len", type=int, default=16384, help="the long prompt of the interference scenario")
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--cancel-requests", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of decoding before the long prompt")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--parallel", type=int, default=16, help="swattn's slots")
    parser.add_argument("--ctx-size", type=int, default=17408)
    parser.add_argument("--serve-option", nargs="*", default=[],
                        help="more options for swattn serve, e.g. --serve-option=--itl-factor=4")
    parser.add_argument("--peer-url", help="a running OpenAI-compatible server with the same model (llama-server)")
    parser.add_argument("--peer-name", default="llama-server")
    parser.add_argument("--url", help="benchmark this running swattn server instead of starting one")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "swattn-bench"))
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests_per_level, args.scenario = [1, 4, 8], 8, ["load"]
    path = _with_tokenizer(_checkpoint(args.dir))
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    proc = None
    if args.url:
        url = args.url
    else:
        proc, url = start_swattn(path, args)
    print(f"# swattn serve on {path} ({args.dtype}, {args.parallel} slots), {os.cpu_count()} CPUs, "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    try:
        return _scenarios(args, url, proc, vocab)
    except (RuntimeError, httpx.HTTPError) as exc:  # a server that is not there or fails every request
        print(f"swattn bench serve: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


def _scenarios(args, url: str, proc, vocab: int) -> int:
    urls = {"swattn": url, **({args.peer_name: args.peer_url} if args.peer_url else {})}
    for u in urls.values():  # asked once here, not inside a timed request (nor blocking its event loop)
        served_model(u)
    if "load" in args.scenario:
        scenario_load(urls, args, vocab)
    if "interference" in args.scenario:
        scenario_interference(url, args, vocab)
    if "prefix" in args.scenario:
        scenario_prefix(url, args, vocab)
    if "cancel" in args.scenario and proc is not None:
        scenario_cancel(url, proc.pid, args, vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
