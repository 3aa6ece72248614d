"""The OpenAI wire format of phijax.serve: request checks and response bodies (no jax, no HTTP).

Every check raises `APIError` with the status and message the client sees, in OpenAI's error
shape: {"error": {"message", "type", "param", "code"}}. Unknown parameters and wrong types are
400s (a client that sends `best_of=3` or `temperature="hot"` learns so instead of getting
something it did not ask for); parameters OpenAI has that phijax does not implement are accepted
only at their neutral value.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid

MAX_STOP = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Request:
    """A checked completions or chat request."""

    chat: bool
    model: str
    prompts: list  # completions: strings or token-id lists; chat: [messages]
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # completions: top alternatives; chat: top_logprobs (when logprobs=true)
    echo: bool = False
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False


def _type_error(name, want, value):
    return APIError(400, f"'{name}' must be {want}, got {json.dumps(value)[:80]}", param=name,
                    code="invalid_type")


def _int(name, v, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer", v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{name}'={v} must be in [{lo}, {hi if hi is not None else 'inf'}]", param=name,
                       code="invalid_value")
    return v


def _num(name, v, lo, hi, lo_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(name, "a number", v)
    if not ((lo < v if lo_open else lo <= v) and v <= hi):
        raise APIError(400, f"'{name}'={v} must be in {'(' if lo_open else '['}{lo}, {hi}]", param=name,
                       code="invalid_value")
    return float(v)


def _bool(name, v):
    if not isinstance(v, bool):
        raise _type_error(name, "a boolean", v)
    return v


def _stop(v):
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or a list of strings", v)
    if len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' has {len(stops)} sequences; at most {MAX_STOP}", param="stop")
    return tuple(s for s in stops if s)


def _neutral(body, name, ok):
    """A parameter phijax accepts only at its neutral value."""
    if name in body and body[name] is not None and not ok(body[name]):
        raise APIError(400, f"'{name}'={json.dumps(body[name])[:80]} is not supported by phijax.serve "
                            f"(leave it out)", param=name, code="unsupported_parameter")


_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user",
           "presence_penalty", "frequency_penalty", "logit_bias",
           "ignore_eos"}  # vLLM's extension: run to max_tokens (load generators want fixed lengths)
COMPLETION_KEYS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_KEYS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                       "tools", "tool_choice", "parallel_tool_calls", "stream_options", "metadata", "store"}


def parse(raw: bytes, *, chat: bool, max_logprobs: int, max_n: int) -> Request:
    """The request body, checked: APIError(400) names the first problem."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    allowed = CHAT_KEYS if chat else COMPLETION_KEYS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unknown parameter(s) {unknown} for /v1/{'chat/' if chat else ''}completions "
                            f"(phijax.serve takes {sorted(allowed)})", param=unknown[0], code="unknown_parameter")
    if "model" not in body:
        raise APIError(400, "'model' is required", param="model")
    model = body["model"]
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    for name in ("presence_penalty", "frequency_penalty"):
        _neutral(body, name, lambda v: v == 0)
    _neutral(body, "logit_bias", lambda v: v == {})
    g = body.get
    n = _int("n", g("n", 1), 1, max_n) if g("n") is not None else 1
    max_tokens = g("max_completion_tokens") if chat and g("max_completion_tokens") is not None else g("max_tokens")
    req = Request(chat=chat, model=model, prompts=[],
                  max_tokens=None if max_tokens is None else _int("max_tokens", max_tokens, 1),
                  temperature=_num("temperature", g("temperature", 1.0) if g("temperature") is not None else 1.0, 0, 2),
                  top_p=_num("top_p", g("top_p") if g("top_p") is not None else 1.0, 0, 1, lo_open=True),
                  n=n, stop=_stop(g("stop")),
                  seed=None if g("seed") is None else _int("seed", g("seed"), 0, 2**32 - 1),
                  stream=_bool("stream", g("stream")) if g("stream") is not None else False)
    req.ignore_eos = _bool("ignore_eos", g("ignore_eos")) if g("ignore_eos") is not None else False
    opts = g("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise _type_error("stream_options", "an object with 'include_usage'", opts)
        req.include_usage = _bool("stream_options.include_usage", opts.get("include_usage", False))
    if chat:
        _neutral(body, "tools", lambda v: v == [])
        _neutral(body, "tool_choice", lambda v: v == "none")
        # json_object is taken as a hint, not enforced (no constrained decoding): callers that ask
        # for JSON parse and re-ask anyway (data_gen.annotate does).
        _neutral(body, "response_format", lambda v: v in ({"type": "text"}, {"type": "json_object"}))
        req.prompts = [_messages(g("messages"))]
        if g("logprobs") is not None and _bool("logprobs", g("logprobs")):
            req.logprobs = _int("top_logprobs", g("top_logprobs") or 0, 0, max_logprobs)
        elif g("top_logprobs") is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:
        _neutral(body, "suffix", lambda v: v == "")
        _neutral(body, "best_of", lambda v: v == n)
        req.prompts = _prompts(g("prompt"))
        if g("logprobs") is not None:
            req.logprobs = _int("logprobs", g("logprobs"), 0, max_logprobs)
        req.echo = _bool("echo", g("echo")) if g("echo") is not None else False
        if req.max_tokens is None:
            req.max_tokens = 16  # OpenAI's default for completions
    return req


def _prompts(p) -> list:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if p is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
               for x in p):
            return [list(x) for x in p]
    raise _type_error("prompt", "a string, a list of strings, a list of token ids or a list of token-id lists "
                                "(none empty)", p)


def _messages(m) -> list[dict]:
    if not isinstance(m, list) or not m:
        raise _type_error("messages", "a non-empty list of messages", m)
    out = []
    for i, msg in enumerate(m):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _type_error(f"messages[{i}]", "an object with 'role' and 'content'", msg)
        content = msg.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise _type_error(f"messages[{i}].content", "a string or a list of text parts", msg.get("content"))
        out.append({"role": msg["role"], "content": content})
    return out


# ---------------------------------------------------------------------- responses

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries, token_text, offset: int) -> dict:
    """The completions API's logprobs object for (TokenLogprob or None) entries; text offsets
    count from `offset` (the prompt's length with echo)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, e in entries:
        text = token_text(tok)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if e is None else e.logprob)
        out["top_logprobs"].append(None if e is None else {token_text(i): lp for i, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(entries, token_text) -> dict:
    def item(i, lp):
        text = token_text(i)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [dict(item(e.token, e.logprob), top_logprobs=[item(i, lp) for i, lp in e.top])
                        for e in entries]}


def envelope(req: Request, rid: str, created: int, choices: list, usage_: dict | None, *, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if req.chat else "text_completion"
    out = {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices}
    if usage_ is not None or not chunk:
        out["usage"] = usage_
    return out


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def now() -> int:
    return int(time.time())


def model_card(name: str, max_len: int, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "phijax", "max_model_len": max_len}
