"""`python -m phijax.serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    python -m phijax.serve --model runs/cpu_demo/export              # a phijax export
    python -m phijax.serve --model runs/x --checkpoint best           # MODEL_DIR: latest, best or a step
    python -m phijax.serve --model microsoft/phi-1 --dtype bfloat16   # a Hugging Face dir or hub id

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream with server-sent
events), GET /v1/models, GET /health. Starlette on uvicorn (the `serve` extra): the ASGI pair
most OpenAI-compatible servers use, small, with streaming responses that notice a client that
went away; docs/serving.md says more. The engine runs in its own thread; requests reach it
through `Engine.submit` and its events come back through the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Sequence

from phijax.serve import protocol
from phijax.serve.protocol import APIError
from phijax.util import cli

log = logging.getLogger("phijax.serve")

PLAIN_TEMPLATE = "plain"


class ChatTemplate:
    """Messages -> prompt text. 'plain' (the default: phi-1 is a base model) joins the messages'
    contents with blank lines, so the model continues the last one; else a Jinja2 file rendered
    as Hugging Face chat templates are (messages, add_generation_prompt=True, eos_token)."""

    def __init__(self, spec: str = PLAIN_TEMPLATE, eos_token: str = ""):
        self.name, self.eos_token, self._tpl = spec, eos_token, None
        if spec != PLAIN_TEMPLATE:
            if not os.path.isfile(spec):
                raise FileNotFoundError(f"--chat_template={spec!r}: not '{PLAIN_TEMPLATE}' and not a Jinja2 file")
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            with open(spec) as f:
                self._tpl = env.from_string(f.read())
            self.name = os.path.basename(spec)

    def render(self, messages: list[dict]) -> str:
        if self._tpl is None:
            return "\n\n".join(m["content"] for m in messages)
        return self._tpl.render(messages=messages, add_generation_prompt=True, eos_token=self.eos_token,
                                bos_token="")


class _Bridge:
    """Engine events onto the event loop: one wake-up per batch of events (an engine step), not
    one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending, self.lock = loop, [], threading.Lock()

    def post(self, queue: asyncio.Queue, item) -> None:  # from the engine thread
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:  # a flush is already scheduled
                return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, item in items:
            queue.put_nowait(item)


class _Request:
    """One HTTP request's sequences and the queue their engine events arrive on."""

    def __init__(self, bridge: _Bridge):
        self.bridge, self.queue = bridge, asyncio.Queue()
        self.seqs: list = []

    def on_event(self, seq, event):  # called from the engine thread
        self.bridge.post(self.queue, (seq, event))


class Server:
    """The HTTP side of one engine: request checks, prompts, responses."""

    def __init__(self, engine, *, model_name: str, chat_template: ChatTemplate, api_key: str | None = None,
                 max_n: int = 16, retry_after_s: int = 1, max_body_bytes: int = 16 << 20):
        self.engine, self.model_name, self.template = engine, model_name, chat_template
        self.tok = engine.model.tokenizer
        self.api_key, self.max_n, self.retry_after_s = api_key, max_n, retry_after_s
        self.max_body_bytes = max_body_bytes
        self.created = protocol.now()
        self._token_text: dict[int, str] = {}
        self._bridge: _Bridge | None = None

    # ------------------------------------------------------------------ app

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def http_error(request, exc):
            return JSONResponse(APIError(exc.status_code, exc.detail or "not found").body(), exc.status_code)

        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def health(self, request):
        from starlette.responses import JSONResponse
        e = self.engine
        body = {"status": "ok" if e.alive else "unavailable", "model": self.model_name, "running": e.running,
                "queued": e.queued, "slots": e.slots}
        if e.error:
            body["error"] = e.error
        return JSONResponse(body, 200 if e.alive else 503)

    async def models(self, request):
        from starlette.responses import JSONResponse
        try:
            self._auth(request)
        except APIError as err:
            return self._error(err)
        return JSONResponse({"object": "list", "data": [protocol.model_card(self.model_name, self.engine.max_len,
                                                                            self.created)]})

    async def completions(self, request):
        return await self._handle(request, chat=False)

    async def chat(self, request):
        return await self._handle(request, chat=True)

    # ------------------------------------------------------------------ requests

    @staticmethod
    def _error(err: APIError):
        from starlette.responses import JSONResponse
        return JSONResponse(err.body(), err.status, headers=err.headers)

    def _auth(self, request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def _body(self, request) -> bytes:
        """The request body, refused (413) past max_body_bytes before it is read whole."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"the request body has {declared} bytes; the limit is {self.max_body_bytes}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"the request body exceeds {self.max_body_bytes} bytes")
        return bytes(body)

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tok.decode([token])
        return text

    def _prompts(self, req: protocol.Request) -> tuple[list[list[int]], list[str]]:
        """(token ids, prompt text) per prompt: strings (and chat messages, rendered) are encoded
        in one batch; token-id prompts are taken as they are and decoded for echo."""
        prompts = [self.template.render(req.prompts[0])] if req.chat else req.prompts
        encoded = iter(self.tok.encode_batch([p for p in prompts if isinstance(p, str)]))
        ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
        texts = [p if isinstance(p, str) else self.tok.decode(p) for p in prompts]
        return ids, texts

    async def _handle(self, request, *, chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse
        from phijax.serve import engine as engine_lib
        try:
            self._auth(request)
            req = protocol.parse(await self._body(request), chat=chat, max_logprobs=self.engine.max_logprobs,
                                 max_n=self.max_n)
            if req.model != self.model_name:
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                    f"{self.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
            ids, texts = self._prompts(req)
            max_tokens = req.max_tokens
            if max_tokens is None:  # chat without a limit: what fits beside the prompt
                max_tokens = self.engine.max_len - max(map(len, ids))
                if max_tokens < 1:
                    raise APIError(400, f"this model's maximum context length is {self.engine.max_len} tokens and "
                                        f"the messages have {max(map(len, ids))}", param="messages",
                                   code="context_length_exceeded")
            params = engine_lib.SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                logprobs=req.logprobs, prompt_logprobs=req.echo and req.logprobs is not None,
                stop_at_eos=not req.ignore_eos)
            loop = asyncio.get_running_loop()
            if self._bridge is None or self._bridge.loop is not loop:
                self._bridge = _Bridge(loop)
            pending = _Request(self._bridge)
            try:
                pending.seqs = self.engine.submit(ids, params, req.n, pending.on_event)
            except engine_lib.QueueFull as e:
                raise APIError(429, f"the server is busy: {e}; retry later", code="queue_full",
                               headers={"Retry-After": str(self.retry_after_s)}) from None
            except ValueError as e:
                code = "context_length_exceeded" if "context length" in str(e) else "invalid_value"
                raise APIError(400, str(e), param="prompt" if not chat else "messages", code=code) from None
            except RuntimeError as e:
                raise APIError(503, f"the server cannot take requests: {e}", type="server_error") from None
        except APIError as err:
            return self._error(err)
        rid, created = protocol.new_id(chat), protocol.now()
        if req.stream:
            return StreamingResponse(self._stream(req, pending, ids, texts, rid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        waiter = asyncio.ensure_future(self._collect(req, pending, ids, texts))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([waiter, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done():  # the client went away (or the server is stopping): free the slots
                self.engine.cancel(pending.seqs)
                waiter.cancel()
            gone.cancel()
        if waiter.cancelled():
            return JSONResponse({}, 499)
        choices, use, error = waiter.result()
        if error:
            return self._error(APIError(500, f"generation failed: {error}", type="server_error"))
        return JSONResponse(protocol.envelope(req, rid, created, choices, use, chunk=False))

    async def _collect(self, req, pending: _Request, ids, texts):
        n = len(pending.seqs)
        text = [""] * n
        lps: list[list] = [[] for _ in range(n)]
        prompt_lps: list = [None] * n
        finish: list = [None] * n
        error = None
        index = {s.id: i for i, s in enumerate(pending.seqs)}
        done = 0
        while done < n:
            seq, ev = await pending.queue.get()
            i = index[seq.id]
            text[i] += ev.text
            lps[i] += ev.logprobs
            if ev.prompt_logprobs is not None:
                prompt_lps[i] = ev.prompt_logprobs
            if ev.finish_reason:
                finish[i], done = ev.finish_reason, done + 1
                error = error or ev.error
        choices = []
        for i, s in enumerate(pending.seqs):
            reason = finish[i] if finish[i] in ("stop", "length") else None
            if req.chat:
                c = {"index": i, "message": {"role": "assistant", "content": text[i]}, "logprobs": None,
                     "finish_reason": reason}
                if req.logprobs is not None:
                    c["logprobs"] = protocol.chat_logprobs(lps[i], self.token_text)
            else:
                prompt_text = texts[s.prompt_index] if req.echo else ""
                c = {"index": i, "text": prompt_text + text[i], "logprobs": None, "finish_reason": reason}
                if req.logprobs is not None:
                    entries = [(e.token, e) for e in lps[i]]
                    if req.echo:
                        plp = prompt_lps[i] or [None] * len(ids[s.prompt_index])
                        entries = list(zip(ids[s.prompt_index], plp)) + entries
                    c["logprobs"] = protocol.completion_logprobs(entries, self.token_text, 0 if req.echo else
                                                                 len(texts[s.prompt_index]))
            choices.append(c)
        return choices, _usage(ids, pending), error

    async def _stream(self, req, pending: _Request, ids, texts, rid, created):
        def chunk(choices, use=None):
            return protocol.sse(protocol.envelope(req, rid, created, choices, use, chunk=True))

        index = {s.id: i for i, s in enumerate(pending.seqs)}
        try:
            for i, s in enumerate(pending.seqs):
                if req.chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                elif req.echo:
                    yield chunk([{"index": i, "text": texts[s.prompt_index], "logprobs": None,
                                  "finish_reason": None}])
            done = 0
            while done < len(pending.seqs):
                seq, ev = await pending.queue.get()
                i = index[seq.id]
                if ev.error:
                    yield protocol.sse(APIError(500, f"generation failed: {ev.error}").body())
                    return
                reason = ev.finish_reason if ev.finish_reason in ("stop", "length") else None
                if ev.finish_reason:
                    done += 1
                if not ev.text and not ev.logprobs and reason is None:
                    continue
                if req.chat:
                    c = {"index": i, "delta": {"content": ev.text} if ev.text else {}, "logprobs": None,
                         "finish_reason": reason}
                    if req.logprobs is not None and ev.logprobs:
                        c["logprobs"] = protocol.chat_logprobs(ev.logprobs, self.token_text)
                else:
                    c = {"index": i, "text": ev.text, "logprobs": None, "finish_reason": reason}
                    if req.logprobs is not None and ev.logprobs:
                        c["logprobs"] = protocol.completion_logprobs([(e.token, e) for e in ev.logprobs],
                                                                     self.token_text, 0)
                yield chunk([c])
            if req.include_usage:
                yield chunk([], _usage(ids, pending))
            yield protocol.sse("[DONE]")
        finally:  # also when the client disconnects (starlette cancels this generator)
            self.engine.cancel([s for s in pending.seqs if s.finish_reason is None])


def _usage(ids, pending: _Request) -> dict:
    """Each prompt's tokens once, every token generated for every choice."""
    return protocol.usage(sum(map(len, ids)), sum(s.completion_tokens for s in pending.seqs))


async def _disconnected(request) -> None:
    """Returns when the client has gone away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.contextmanager
def running(server: Server, host: str = "127.0.0.1", port: int = 0):
    """Serves `server` (its engine started) from a background thread; yields the base URL
    (http://host:port/v1). Tests and benchmarks use this; the command line runs uvicorn itself."""
    import uvicorn
    sock = socket.socket()
    sock.bind((host, port))
    uv = uvicorn.Server(uvicorn.Config(server.app(), lifespan="off", log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs=dict(sockets=[sock]), name="phijax-serve-http", daemon=True)
    thread.start()
    while not uv.started and thread.is_alive():
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


# ---------------------------------------------------------------------- command line

def _parse_mesh(spec: str | None):
    if not spec:
        return None
    from phijax import sharding
    try:
        shape = tuple(int(x) for x in spec.split(","))
        if len(shape) != 3:
            raise ValueError
    except ValueError:
        raise ValueError(f"--mesh={spec!r}: give data,fsdp,tensor sizes, e.g. 1,1,2 (-1: the rest)") from None
    return sharding.make_mesh(shape)


def resolve_model(path: str, checkpoint: str | None) -> tuple[str, int | None]:
    """(directory to load, step) for --model/--checkpoint: 'best' is MODEL_DIR/best, 'latest'
    the newest step, an integer that step."""
    if checkpoint in (None, "latest"):
        return path, None
    if checkpoint == "best":
        best = os.path.join(path, "best")
        if not os.path.isdir(best):
            raise FileNotFoundError(f"--checkpoint=best: {best} does not exist (training writes it when "
                                    "train_eval finds a new best pass@1)")
        return best, None
    try:
        return path, int(checkpoint)
    except ValueError:
        raise ValueError(f"--checkpoint={checkpoint!r}: 'latest', 'best' or a step number") from None


def _tokenizer_for(path: str, given: str | None) -> str | None:
    """--tokenizer, else the model dir's, else (a MODEL_DIR) its export's or best's."""
    if given:
        return given
    for sub in ("", "export", "best"):
        p = os.path.join(path, sub, "tokenizer.json")
        if os.path.isfile(p):
            return p
    return None


def build_parser():
    p = cli.ArgumentParser(description="Serve a phi model over an OpenAI-compatible HTTP API with continuous "
                                       "batching (/v1/completions, /v1/chat/completions, /v1/models, /health).")
    p.add_argument("--model", required=True, help="a phijax export, a training MODEL_DIR, a Hugging Face Phi "
                                                  "directory or a hub id (from the local hub cache)")
    p.add_argument("--checkpoint", default=None, help="with a MODEL_DIR: latest (default), best, or a step")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's)")
    p.add_argument("--model_name", default=None, help="the name clients ask for (default: the --model argument)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (the KV cache's rows)")
    p.add_argument("--max_len", type=int, default=None, help="the cache's length: prompt + max_tokens of any "
                                                             "request (default: the model's max_len)")
    p.add_argument("--prefill_chunk", type=int, default=256, help="longest prefill call, a power of two")
    p.add_argument("--max_queued", type=int, default=256, help="sequences waiting for a slot before 429s")
    p.add_argument("--max_n", type=int, default=16, help="largest n per request")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the model's; float32 for HF dirs)")
    p.add_argument("--param_dtype", default=None, help="the weights' dtype (default: the model's)")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor mesh over the local devices, e.g. 1,1,2")
    p.add_argument("--chat_template", default=PLAIN_TEMPLATE, help="'plain' or a Jinja2 chat template file")
    p.add_argument("--api_key_env", default=None, help="require 'Authorization: Bearer $<this variable>'")
    p.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto",
                   help="decode with the layer scan (compile time flat in depth) or each layer from its own weights "
                        "(faster per token; compile time grows with depth); auto: unrolled up to 8 layers")
    p.add_argument("--decode_steps", type=int, default=1,
                   help="tokens per decode call: fewer host round trips and larger stream chunks; a finished "
                        "sequence's slot is freed (and a waiting one joins) at the end of the call")
    p.add_argument("--attention_windows", action="store_true",
                   help="decode steps attend over the shortest window (128, 256, ... max_len) covering the running "
                        "sequences: faster for short ones, but a request's tokens may then depend on its neighbours "
                        "in rare near-ties (default: batch-invariant, the whole cache every step)")
    p.add_argument("--lazy_compile", action="store_true", help="compile each prefill bucket on first use "
                                                               "(logged) instead of at start-up")
    p.add_argument("--drain_timeout", type=float, default=30.0, help="Ctrl-C: seconds to let running requests "
                                                                     "finish before they are cancelled")
    p.add_argument("--log_level", default="info")
    return p


def build(args):
    """(Server, engine) from parsed flags; raises ValueError/FileNotFoundError on bad input."""
    from phijax import decode
    from phijax.serve.engine import Engine

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api_key_env={args.api_key_env}: that variable is unset or empty")
    path, step = resolve_model(args.model, args.checkpoint)
    from phijax import convert
    local = convert.resolve_model_dir(path)
    tokenizer = _tokenizer_for(local, args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.json found beside the model; pass --tokenizer")
    template = ChatTemplate(args.chat_template)
    mesh = _parse_mesh(args.mesh)
    t0 = time.perf_counter()
    model = decode.load_for_inference(local, tokenizer, dtype=args.dtype, param_dtype=args.param_dtype, step=step)
    log.info("loaded %s (%d layers, d_model %d, max_len %d, %s) in %.1f s", args.model, model.cfg.n_layers,
             model.cfg.d_model, model.cfg.max_len, model.cfg.dtype, time.perf_counter() - t0)
    engine = Engine(model, slots=args.slots, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                    max_queued=args.max_queued, batch_invariant=not args.attention_windows, layers=args.layers,
                    decode_steps=args.decode_steps, mesh=mesh)
    template.eos_token = model.tokenizer.decode([engine.eos_id]) if engine.eos_id is not None else ""
    server = Server(engine, model_name=args.model_name or args.model, chat_template=template, api_key=api_key,
                    max_n=args.max_n)
    return server, engine


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    try:
        import uvicorn
        importlib.import_module("starlette")
    except ImportError as e:
        return cli.fail(f"phijax.serve needs the 'serve' extra (pip install 'phijax[serve]'): {e}")
    try:
        server, engine = build(args)
    except (ValueError, FileNotFoundError) as e:
        return cli.fail(e)
    if not args.lazy_compile:
        t0 = time.perf_counter()
        times = engine.compile()
        log.info("compiled %d programs in %.1f s (slowest: %s)", len(times), time.perf_counter() - t0,
                 max(times, key=times.get))
    engine.start()
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        engine.shutdown()
        return cli.fail(f"cannot listen on {args.host}:{args.port}: {e}")
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(server.app(), log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout,
                            lifespan="off", access_log=False)
    uv = uvicorn.Server(config)
    log.info("serving %r on http://%s:%d/v1 (%d slots, max_len %d)", server.model_name, host, port, engine.slots,
             engine.max_len)
    print(f"phijax.serve: ready on http://{host}:{port}/v1", flush=True)
    # uvicorn drains on the first Ctrl-C (SIGINT or SIGTERM), cancels what still runs after
    # --drain_timeout, then raises the signal again: KeyboardInterrupt here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupted = False
    try:
        uv.run(sockets=[sock])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        engine.shutdown()
    log.info("stopped: %d tokens generated in %d decode steps", engine.stats["tokens"], engine.stats["decode_steps"])
    return cli.EXIT_INTERRUPTED if interrupted else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
