"""Serving under load: phijax.serve vs `transformers serve`, same run, same weights, and a static-batch floor.

    python -m phijax.bench.serve_load --model runs/cpu_demo/export [--clients 1,8,64] [--requests 128] \\
        [--max_tokens 128] [--out serve_load.json]

Per concurrency level (`--clients`), N clients each send HumanEval prompts (phijax.evaluate.problems,
in task order, cycling; prompts that do not fit beside max_tokens in the model's context are left
out) to /v1/completions, streamed (stream_options include_usage), greedy, until `--requests` in
all have been answered; each client sends its next request when its last one ends. Peers:
  phijax        `python -m phijax.serve --model MODEL --slots N` (N = the level's clients unless
                --slots), a subprocess started per level;
  transformers  `transformers serve HF_DIR --device cpu --dtype float32 --continuous-batching`
                (--no-continuous-batching: sequential generate), a subprocess started per level on
                the same weights: a phijax export is converted first (`phijax.convert orbax-to-hf`,
                float32) into a temporary Hugging Face directory with its tokenizer.json and an
                end-of-text id, so both servers tokenize alike and stop at end-of-text;
  sampler       `phijax.decode.Sampler(batch_size=N).generate_tokens` in-process on the same
                prompts (static batches, no HTTP): the floor; tokens/s only.
Each server gets a few untimed warm-up requests after it is ready. Per request: time to first
token (TTFT) and time per output token after the first ((last - first chunk) / (tokens - 1)).
Per level: generated tokens (the stream's usage, else the chunks) / wall time, TTFT and
per-token latency p50/p99, failures, and phijax.serve / transformers serve throughput.
The load generator shares the machine with the server: on a small CPU it takes some of its time.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from phijax.bench import save_json
from phijax.util import cli

PEERS = ("phijax", "transformers", "sampler")
TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


# ---------------------------------------------------------------------- servers as subprocesses

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess in its own process group: output to a log file, ready when GET
    /v1/models answers 200, stopped (SIGINT, then SIGKILL) on exit, also on errors."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None, log_dir: str = "."):
        self.name, self.argv, self.port = name, argv, port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.log_path = os.path.join(log_dir, f"{name}_{port}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)

    def tail(self, n: int = 40) -> str:
        with open(self.log_path, "rb") as f:
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until /v1/models answered; RuntimeError (with the log's tail) if it exits or times out."""
        import urllib.error
        import urllib.request

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready "
                                   f"({' '.join(self.argv)}); its output ends:\n{self.tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready after {timeout_s:.0f} s ({' '.join(self.argv)}); "
                           f"its output ends:\n{self.tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Anything the server left in its group (transformers serve runs the model in a child process).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def transformers_cli() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "transformers.cli.transformers"]


def phijax_argv(args, slots: int) -> list[str]:
    argv = [sys.executable, "-m", "phijax.serve", "--model", args.model, "--port", "{port}", "--slots", str(slots),
            "--prefill_chunk", str(args.prefill_chunk), "--max_queued", str(max(256, args.requests)),
            "--log_level", "warning"]
    if args.max_len:
        argv += ["--max_len", str(args.max_len)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    return argv + args.serve_args.split()


def transformers_argv(args, hf_dir: str) -> list[str]:
    return transformers_cli() + [
        "serve", hf_dir, "--port", "{port}", "--host", "127.0.0.1", "--device", args.torch_device,
        "--dtype", args.dtype or "float32",
        "--continuous-batching" if args.continuous_batching else "--no-continuous-batching",
        "--log-level", "warning"] + args.transformers_args.split()


def start_server(name: str, argv: list[str], args, log_dir: str) -> ServerProcess:
    port = free_port()
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    srv = ServerProcess(name, [a.replace("{port}", str(port)) for a in argv], port, env, log_dir)
    try:
        ready_s = srv.wait_ready(args.startup_timeout)
    except BaseException:
        srv.stop()
        raise
    print(f"  {name}: ready in {ready_s:.1f} s ({' '.join(srv.argv)})", flush=True)
    return srv


# ---------------------------------------------------------------------- the weights, both ways

def write_hf_tokenizer(hf_dir: str, tokenizer_path: str) -> None:
    """Saves `tokenizer_path` into the Hugging Face directory `hf_dir` as transformers reads it
    (PreTrainedTokenizerFast with its end-of-text and pad tokens) and sets the tokenizer's
    end-of-text and pad ids in its config.json and generation_config.json."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from phijax import convert

    raw = Tokenizer.from_file(tokenizer_path)
    eos, pad = raw.token_to_id(EOS_TOKEN), raw.token_to_id(PAD_TOKEN)
    special = {"eos_token": EOS_TOKEN} if eos is not None else {}
    if pad is not None:
        special["pad_token"] = PAD_TOKEN
    PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, **special).save_pretrained(hf_dir)
    cfg_path = os.path.join(hf_dir, convert.CONFIG_FILE)
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    hf_cfg.update(eos_token_id=eos, pad_token_id=pad if pad is not None else 0)
    with open(cfg_path, "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    with open(os.path.join(hf_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": hf_cfg["pad_token_id"]}, f)


def hf_dir_for(model: str, tokenizer_path: str, work: str, dtype: str) -> str:
    """A Hugging Face Phi directory transformers loads: `model` itself if it is one (it needs its
    tokenizer files), else `model` (a phijax export or MODEL_DIR) converted into `work/hf`, with the
    tokenizer saved as transformers reads it and the tokenizer's end-of-text as eos_token_id."""
    from phijax import convert

    if os.path.isfile(os.path.join(model, convert.CONFIG_FILE)):
        return model
    out = os.path.join(work, "hf")
    rc = convert.main(["orbax-to-hf", "--ckpt", model, "--out", out, "--dtype", dtype])
    if rc:
        raise RuntimeError(f"converting {model} to a Hugging Face directory failed (exit {rc})")
    write_hf_tokenizer(out, tokenizer_path)
    return out


def request_list(tok, max_len: int, max_tokens: int, n: int) -> tuple[list[str], list[list[int]], int]:
    """The first n HumanEval prompts (cycling) that fit beside max_tokens in max_len tokens, their
    ids, and how many of the 164 did not fit."""
    from phijax.evaluate import problems

    probs = problems.load_problems("humaneval")
    texts = [p.prompt for p in probs]
    ids = tok.encode_batch(texts)
    fit = [(t, i) for t, i in zip(texts, ids) if len(i) + max_tokens <= max_len]
    if not fit:
        raise ValueError(f"no HumanEval prompt fits beside max_tokens={max_tokens} in {max_len} tokens")
    chosen = [fit[k % len(fit)] for k in range(n)]
    return [t for t, _ in chosen], [i for _, i in chosen], len(texts) - len(fit)


# ---------------------------------------------------------------------- the load generator

@dataclasses.dataclass
class Result:
    ttft: float | None = None      # s from sending to the first text chunk
    tpot: float | None = None      # s per output token after the first
    tokens: int = 0                # generated tokens: usage, else text chunks
    error: str | None = None
    text: str = ""


async def one_request(client, model_name: str, prompt: str, max_tokens: int) -> Result:
    r = Result()
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    try:
        stream = await client.completions.create(model=model_name, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0.0, stream=True,
                                                 stream_options={"include_usage": True})
        async for ch in stream:
            if getattr(ch, "usage", None) is not None and ch.usage.completion_tokens is not None:
                usage = ch.usage.completion_tokens
            for c in ch.choices or ():
                if c.text:
                    r.text += c.text
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
    except Exception as e:  # noqa: BLE001  (reported per level, with the first message)
        r.error = f"{type(e).__name__}: {e}"
    r.tokens = usage if usage is not None else chunks
    if first is not None:
        r.ttft = first - t0
        if r.tokens > 1:
            r.tpot = (last - first) / (r.tokens - 1)
    return r


async def run_load(base_url: str, model_name: str, prompts: list[str], clients: int, max_tokens: int,
                   timeout_s: float) -> tuple[list[Result], float]:
    """`clients` concurrent loops over the shared prompt list; (results, wall seconds)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout_s)
    results: list[Result | None] = [None] * len(prompts)
    next_i = iter(range(len(prompts)))

    async def worker():
        for i in next_i:
            results[i] = await one_request(client, model_name, prompts[i], max_tokens)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await client.close()
    return results, time.perf_counter() - t0


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def summarize(server: str, clients: int, results: list[Result], wall: float, note: str = "") -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in results if r.error is not None]
    return {"server": server, "clients": clients, "requests": len(results), "failed": len(errors),
            "first_error": errors[0] if errors else None, "gen_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99), "note": note}


def measure_server(name: str, argv: list[str], model_name: str, prompts: list[str], clients: int, args,
                   log_dir: str, note: str = "") -> dict:
    srv = start_server(name, argv, args, log_dir)
    try:
        warm = prompts[:min(len(prompts), max(2, min(clients, 4)))]
        w, _ = asyncio.run(run_load(srv.base_url, model_name, warm, len(warm), min(args.max_tokens, 8),
                                    args.request_timeout))
        bad = [r.error for r in w if r.error]
        if bad:
            raise RuntimeError(f"{name}: warm-up request failed: {bad[0]}\n{name}'s output ends:\n{srv.tail()}")
        results, wall = asyncio.run(run_load(srv.base_url, model_name, prompts, clients, args.max_tokens,
                                             args.request_timeout))
        row = summarize(name, clients, results, wall, note)
        row["texts"] = [r.text for r in results]
        if "Falling back to sequential generation" in srv.tail(200):
            row["note"] += " (it fell back to sequential generation)"
        if srv.proc.poll() is not None:
            row["first_error"] = (row["first_error"] or "") + f" (server exited {srv.proc.returncode})"
        if row["failed"]:
            row["server_log_tail"] = srv.tail(20)
        return row
    finally:
        srv.stop()


def measure_sampler(model_dir: str, prompt_ids: list[list[int]], clients: int, max_tokens: int, dtype) -> dict:
    """Static batches of `clients` rows through phijax.decode.Sampler; a first untimed call
    compiles the buckets (the timed call reuses them: same prompts, same batch size)."""
    from phijax import decode

    im = decode.load_for_inference(model_dir, dtype=dtype)
    sampler = decode.Sampler(im, batch_size=clients)
    sampler.generate_tokens(prompt_ids, max_tokens)
    t0 = time.perf_counter()
    out = sampler.generate_tokens(prompt_ids, max_tokens)
    wall = time.perf_counter() - t0
    tokens = sum(len(o[0]) for o in out)
    nan = float("nan")
    return {"server": "sampler", "clients": clients, "requests": len(prompt_ids), "failed": 0, "first_error": None,
            "gen_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_ms": nan,
            "ttft_p99_ms": nan, "tpot_p50_ms": nan, "tpot_p99_ms": nan, "note": "static batches, in-process"}


# ---------------------------------------------------------------------- output

def fmt(x, spec=",.0f"):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'server':14s} {'clients':>7s} {'requests':>8s} {'failed':>6s} {'gen tokens':>10s} {'tok/s':>8s} "
            f"{'TTFT p50/p99 ms':>17s} {'tok lat p50/p99 ms':>19s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['server']:14s} {r['clients']:7d} {r['requests']:8d} {r['failed']:6d} {r['gen_tokens']:10d} "
              f"{fmt(r['tokens_per_s'], ',.1f'):>8s} "
              f"{fmt(r['ttft_p50_ms']) + ' / ' + fmt(r['ttft_p99_ms']):>17s} "
              f"{fmt(r['tpot_p50_ms'], ',.1f') + ' / ' + fmt(r['tpot_p99_ms'], ',.1f'):>19s}")
    by = {r["server"]: r for r in rows}
    if "phijax" in by and "transformers" in by and by["transformers"]["tokens_per_s"] > 0:
        same = sum(a == b for a, b in zip(by["phijax"]["texts"], by["transformers"]["texts"]))
        print(f"phijax.serve / transformers serve throughput: "
              f"{by['phijax']['tokens_per_s'] / by['transformers']['tokens_per_s']:.2f}x; identical completions "
              f"{same}/{len(by['phijax']['texts'])}; transformers serve: {by['transformers']['note']}")
    for r in rows:
        if r["failed"]:
            print(f"{r['server']}: {r['failed']} of {r['requests']} requests failed; first: {r['first_error']}")
            if r.get("server_log_tail"):
                print(f"{r['server']}'s output ends:\n{r['server_log_tail']}")
    print(flush=True)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a phijax export, MODEL_DIR or Hugging Face Phi directory "
                                                  "(with its tokenizer.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's)")
    p.add_argument("--clients", default="1,8,64", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=128, help="requests per level (all clients together)")
    p.add_argument("--max_tokens", type=int, default=128, help="max_tokens of every request (greedy)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"which of {','.join(PEERS)} to measure")
    p.add_argument("--slots", type=int, default=None, help="phijax.serve --slots (default: the level's clients)")
    p.add_argument("--max_len", type=int, default=None, help="phijax.serve --max_len (default: the model's)")
    p.add_argument("--prefill_chunk", type=int, default=256, help="phijax.serve --prefill_chunk")
    p.add_argument("--dtype", default="float32", help="both sides' compute dtype")
    p.add_argument("--continuous_batching", action=argparse.BooleanOptionalAction,
                   default=True, help="transformers serve --continuous-batching (else sequential generate)")
    p.add_argument("--torch_device", default="cpu", help="transformers serve --device")
    p.add_argument("--serve_args", default="", help="more phijax.serve flags, space-separated (e.g. "
                                                    "'--layers unrolled --attention_windows')")
    p.add_argument("--transformers_args", default="", help="more `transformers serve` flags, space-separated "
                                                           "(e.g. '--cb-num-blocks 512')")
    p.add_argument("--startup_timeout", type=float, default=900.0, help="seconds a server may take to be ready")
    p.add_argument("--request_timeout", type=float, default=900.0, help="seconds one request may take")
    p.add_argument("--out", "--json", dest="out", default=None, help="also write the figures here (JSON)")
    args = p.parse_args(argv)
    cli.setup_logging()
    levels = [int(c) for c in args.clients.split(",")]
    peers = [x for x in args.peers.split(",") if x]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown or not levels or min(levels) < 1 or args.requests < 1 or args.max_tokens < 1:
        return cli.fail(f"bad flags: peers {unknown or 'ok'}, clients {levels}, requests {args.requests}, "
                        f"max_tokens {args.max_tokens}")

    import jax
    import torch
    import transformers

    from phijax import decode
    from phijax.data import vocab
    from phijax.serve.server import _tokenizer_for

    model = os.path.abspath(args.model)
    tok_path = _tokenizer_for(model, args.tokenizer)
    if tok_path is None:
        return cli.fail(f"{args.model}: no tokenizer.json beside the model; pass --tokenizer")
    tok = vocab.BPETokenizer(tok_path)
    im_cfg = decode.load_for_inference(model, tok_path).cfg
    max_len = args.max_len or im_cfg.max_len
    prompts, prompt_ids, dropped = request_list(tok, max_len, args.max_tokens, args.requests)
    lens = [len(i) for i in prompt_ids]
    mode = "continuous batching" if args.continuous_batching else "sequential generate (no continuous batching)"
    print(f"machine: {os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}"
          f" ({torch.get_num_threads()} threads), transformers {transformers.__version__}", flush=True)
    print(f"model {args.model}: {im_cfg.n_layers} layers, d_model {im_cfg.d_model}, vocab {im_cfg.vocab_size}, "
          f"max_len {max_len}, {args.dtype}; {args.requests} HumanEval requests per level (prompts "
          f"{min(lens)}-{max(lens)} tokens, mean {np.mean(lens):.0f}; {dropped} of 164 left out: longer than "
          f"{max_len} - {args.max_tokens}), max_tokens {args.max_tokens}, greedy, streamed", flush=True)
    if "transformers" in peers:
        print(f"transformers serve: {mode} on {args.torch_device}", flush=True)

    work = tempfile.mkdtemp(prefix="serve_load_")
    results = []
    try:
        hf_dir = hf_dir_for(model, tok_path, work, args.dtype) if "transformers" in peers else None
        for clients in levels:
            print(f"== {clients} client(s)", flush=True)
            rows = []
            if "phijax" in peers:
                slots = args.slots or clients
                rows.append(measure_server("phijax", phijax_argv(args, slots), args.model, prompts, clients, args,
                                           work, note=f"{slots} slots"))
            if "transformers" in peers:
                rows.append(measure_server("transformers", transformers_argv(args, hf_dir), hf_dir, prompts,
                                           clients, args, work, note=mode))
            if "sampler" in peers:
                rows.append(measure_sampler(model, prompt_ids, clients, args.max_tokens, args.dtype))
            print_table(rows)
            results += [{k: v for k, v in r.items() if k != "texts"} for r in rows]
            save_json(args.out, {"model": args.model, "max_tokens": args.max_tokens, "transformers_mode": mode,
                                 "rows": results})
    except RuntimeError as e:
        return cli.fail(e, cli.EXIT_FAILED)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
