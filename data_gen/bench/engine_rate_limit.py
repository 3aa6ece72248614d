"""Benchmark: how much of a configured rate limit the engine actually uses.

A loopback fake server (another process) with realistic latency enforces requests/min and
tokens/min limits like the real API (429 + Retry-After past them). The engine, configured with
the same limits, sends enough requests to last about ``--duration_s``; then, against a fresh
server, a plain asyncio + semaphore loop sends the same number of requests with the same
client (the openai client's default retries, which honour Retry-After). Printed: achieved
successful requests/min and tokens/min (reported usage) as fractions of the limits, 429s
received, failures, and the engine/baseline ratio.

    python -m data_gen.bench.engine_rate_limit --duration_s 75 --rpm 600 --tpm 200000 --latency 0.5 2.0
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

import openai  # noqa: F401 - imported before any timing starts

from data_gen.llm.engine import Engine, EngineConfig
from data_gen.llm.fake_server import admin
from data_gen.llm.request import Request, messages_from
from phijax.util import cli
from phijax.util.files import save_json

KEY = "sk-bench-not-a-real-key-000000"


def start_server(a) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "data_gen.llm.fake_server", "--port", "0", "--latency", *map(str, a.latency),
           "--completion_tokens", *map(str, a.completion_tokens), "--rpm", str(a.rpm), "--tpm", str(a.tpm),
           "--burst_s", str(a.server_burst_s), "--responder", "lorem"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("listening on "):
        p.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return p, line.split()[-1]


def make_requests(n: int, a, tag: str) -> list[Request]:
    # ~80 prompt tokens each
    return [Request(model="bench", sample_index=i,
                    messages=messages_from("You write short Python lessons.",
                                           f"[{tag} {i}] Explain list comprehensions with an example. " * 4),
                    params={"max_tokens": a.max_tokens}) for i in range(n)]


def summarize(name, n_ok, n_failed, tokens, elapsed, stats, a) -> dict:
    rpm, tpm = n_ok / elapsed * 60, tokens / elapsed * 60
    return {"name": name, "ok": n_ok, "failed": n_failed, "elapsed_s": round(elapsed, 2),
            "requests_per_min": round(rpm, 1), "tokens_per_min": round(tpm), "rpm_fraction": round(rpm / a.rpm, 4),
            "tpm_fraction": round(tpm / a.tpm, 4), "server_429": stats["faults"].get("rate_limited", 0),
            "http_requests": stats["total"], "max_in_flight": stats["max_in_flight"]}


def run_engine(a, url: str, reqs: list[Request]) -> dict:
    cfg = EngineConfig(model="bench", base_url=url, api_key=KEY, concurrency=a.concurrency, rpm=a.rpm, tpm=a.tpm,
                       burst_s=1.0, timeout_s=60, progress=False)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        rep = Engine(d, cfg).run_sync(reqs)
        elapsed = time.monotonic() - t0
    return summarize("engine", rep.by_status.get("ok", 0) + rep.by_status.get("length", 0), rep.n_failed,
                     rep.prompt_tokens + rep.completion_tokens, elapsed, admin(url, "stats"), a)


def run_baseline(a, url: str, reqs: list[Request]) -> dict:
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(api_key=KEY, base_url=url, timeout=60)  # default retries (2), honour Retry-After
        sem = asyncio.Semaphore(a.concurrency)
        ok = failed = tokens = 0

        async def one(r: Request):
            nonlocal ok, failed, tokens
            async with sem:
                try:
                    resp = await client.chat.completions.create(model=r.model, messages=list(r.messages), **r.params)
                    ok += 1
                    tokens += resp.usage.total_tokens
                except Exception:  # noqa: BLE001 - a failed request is what we count
                    failed += 1
        t0 = time.monotonic()
        await asyncio.gather(*(one(r) for r in reqs))
        elapsed = time.monotonic() - t0
        await client.close()
        return ok, failed, tokens, elapsed
    ok, failed, tokens, elapsed = asyncio.run(main())
    return summarize("baseline (asyncio + semaphore)", ok, failed, tokens, elapsed, admin(url, "stats"), a)


def main(argv=None) -> dict:
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration_s", type=float, default=75.0)
    p.add_argument("--rpm", type=float, default=600)
    p.add_argument("--tpm", type=float, default=200_000)
    p.add_argument("--latency", type=float, nargs=2, default=(0.5, 2.0))
    p.add_argument("--completion_tokens", type=int, nargs=2, default=(100, 400))
    p.add_argument("--max_tokens", type=int, default=600)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--server_burst_s", type=float, default=2.0)
    p.add_argument("--json", "--json_out", dest="json_out", help="also write the figures here")
    a = p.parse_args(argv)
    cli.setup_logging()
    # Requests for the duration at the binding limit (est. ~90 prompt + mean completion tokens each).
    per_req = 90 + sum(a.completion_tokens) / 2
    n = max(int(min(a.rpm, a.tpm / per_req) * a.duration_s / 60), 10)
    print(f"limits: {a.rpm:.0f} req/min, {a.tpm:,.0f} tok/min; latency {a.latency[0]}-{a.latency[1]} s; "
          f"completions {a.completion_tokens[0]}-{a.completion_tokens[1]} tokens (max_tokens {a.max_tokens}); "
          f"{n} requests per side; concurrency {a.concurrency}", flush=True)
    rows = []
    for name, fn in (("engine", run_engine), ("baseline", run_baseline)):
        proc, url = start_server(a)
        try:
            rows.append(fn(a, url, make_requests(n, a, name)))
        finally:
            proc.terminate()
            proc.wait()
        r = rows[-1]
        print(f"{r['name']:32s} ok {r['ok']:5d} failed {r['failed']:4d} in {r['elapsed_s']:7.1f}s: "
              f"{r['requests_per_min']:7.1f} req/min ({r['rpm_fraction']:.1%} of limit), "
              f"{r['tokens_per_min']:9,d} tok/min ({r['tpm_fraction']:.1%}), server 429s {r['server_429']}, "
              f"HTTP requests {r['http_requests']}", flush=True)
    eng, base = rows
    out = {"engine": eng, "baseline": base,
           "ratio_tokens_per_min": round(eng["tokens_per_min"] / max(base["tokens_per_min"], 1), 3),
           "ratio_requests_per_min": round(eng["requests_per_min"] / max(base["requests_per_min"], 1e-9), 3)}
    print(f"engine / baseline: {out['ratio_requests_per_min']:.2f}x successful requests/min, "
          f"{out['ratio_tokens_per_min']:.2f}x tokens/min")
    save_json(a.json_out, out)
    return out


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
