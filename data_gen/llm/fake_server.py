"""A loopback OpenAI-compatible HTTP server for tests and the benchmark (no internet needed).

Speaks POST /v1/chat/completions, POST /v1/completions, the Files API (POST /v1/files
multipart, GET /v1/files/{id}, GET /v1/files/{id}/content) and the Batch API (POST/GET
/v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel), over real HTTP/1.1 with
keep-alive, so the real ``openai`` client talks to it. Admin: GET /_admin/stats,
POST /_admin/config, POST /_admin/reset.

Faults are rules matched per request, in order (the first that applies wins)::

    {"kind": "429", "first": 1, "retry_after": 0.2}      # first receipt of every body: 429
    {"kind": "500", "match": "sample 7", "first": 2}    # bodies containing the text: twice
    {"kind": "drop", "prob": 0.1}                        # 10% of receipts (seeded)
    {"kind": "reply", "text": "no idea", "match": "doc 3", "unless": "could not be parsed"}

kinds: 429 (with Retry-After), 500, 502, 503, 400 (echoes the Authorization header, to test
that keys are redacted), 403 (permission denied), timeout (answers after ``delay`` s), drop
(resets the connection), malformed (200 with a cut-off JSON body), no_choices (200 with a
well-formed JSON body without choices), length (finish_reason "length"), slow (``delay`` s
more latency), expire (batch only: the request is missing from the output), reply (a normal
200 whose content is the rule's ``text``: scripted answers). ``unless``: not for bodies containing
that text. ``first``: only the first N receipts of an identical body; ``prob``: a seeded coin per
(body, receipt). It can also enforce its own rpm / tpm limits (token buckets, prompt +
max_tokens charged up front, refunded to the completion's usage), answering 429 with
Retry-After like the real API. With ``api_key`` set, any other key is answered 401 (the message
echoes the key, as careless servers do); with ``models`` set, any other model is answered 404.

Stats count requests per body hash (``by_body``) and the 200s served per body (``ok_by_body``);
the hash is in every response id (chatcmpl-<hash>-<n>), so a test can tell whether completed
work was requested again.

Content: ``responder`` 'lorem' (filler of the configured completion length), 'textbook'
(markdown with prose and a ```python block; a seeded share are refusals, broken code, short,
near-duplicates), 'exercises' (a function named as the prompt asks, with docstring and asserts;
a seeded share wrong, broken, unnamed or duplicated), 'annotate' (a JSON educational-value score
0-10 with a reason; a seeded share fenced, wrapped in prose, unparseable or out of range), or
'auto' (by model name).

    python -m data_gen.llm.fake_server --port 8000 --latency 0.5 2.0 --rpm 600 --tpm 200000
"""
from __future__ import annotations

import argparse
import collections
import email.parser
import email.policy
import hashlib
import http.server
import json
import random
import re
import socket
import struct
import sys
import threading
import time
import urllib.request
import uuid
from typing import Any

from data_gen.llm.ratelimit import TokenBucket
from data_gen.llm.request import canonical_json, estimate_tokens

FAULT_KINDS = ("429", "500", "502", "503", "400", "403", "timeout", "drop", "malformed", "no_choices", "length",
               "slow", "expire", "reply")
RESPONDERS = ("auto", "lorem", "textbook", "exercises", "annotate")

DEFAULTS: dict[str, Any] = {
    "latency": (0.0, 0.0),          # uniform seconds per request
    "completion_tokens": (40, 120),  # lorem target length
    "faults": [],
    "rpm": None, "tpm": None, "burst_s": 2.0,
    "responder": "auto",
    "textbook_mix": {"refusal": 0.06, "bad_code": 0.06, "short": 0.05, "boilerplate": 0.05, "near_dup": 0.08},
    "exercises_mix": {"wrong": 0.08, "syntax": 0.05, "no_asserts": 0.05, "wrong_name": 0.05, "dup": 0.08},
    "annotate_mix": {"fenced": 0.15, "wrapped": 0.1, "prose": 0.05, "out_of_range": 0.03},
    "batch_delay_s": 0.0,            # a batch stays in_progress this long
    "api_key": None,                 # the only key accepted (None: any)
    "models": None,                  # the models served (None: any)
    "seed": 0,
}

_WORDS = ("list dictionary value key index loop function argument return string integer float tuple set "
          "element sequence iterate compute total result variable method class object attribute recursion "
          "stack queue graph node edge tree sort search binary linear complexity memory efficient simple "
          "example reader student learn understand concept practice exercise problem solution data structure "
          "algorithm input output file line character number even odd prime square sum average maximum minimum "
          "count filter map reduce comprehension generator yield lambda closure scope module import package "
          "exception error handle raise test assert check condition branch boolean true false compare equal "
          "order reverse slice append insert remove pop copy merge split join format print range length "
          "matrix vector row column grid path distance weight cost score rank group pair window prefix suffix").split()
_TOPICS = ("lists", "strings", "recursion", "sorting", "dictionaries", "sets", "generators", "classes",
           "file handling", "searching", "dynamic programming", "graphs", "math", "iterators")


def body_hash(body: dict) -> str:
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()[:16]


def _prompt_text(body: dict) -> str:
    if "messages" in body:
        return "\n".join(str(m.get("content", "")) for m in body.get("messages") or [])
    return str(body.get("prompt", ""))


def _rng(*parts: Any) -> random.Random:
    return random.Random(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest())


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, n_sentences: int) -> str:
    return " ".join(_sentence(rng, rng.randint(8, 16)) for _ in range(n_sentences))


def _pick(rng: random.Random, mix: dict[str, float]) -> str:
    x, acc = rng.random(), 0.0
    for name, p in mix.items():
        acc += p
        if x < acc:
            return name
    return "good"


def respond_lorem(rng: random.Random, target_tokens: int) -> str:
    out: list[str] = []
    while estimate_tokens(" ".join(out)) < target_tokens:
        out.append(_sentence(rng, rng.randint(6, 14)))
    return " ".join(out)


def _code_block(rng: random.Random, broken: bool) -> str:
    fname = "_".join(rng.sample(_WORDS, 2))
    arg, k = rng.choice(["values", "items", "numbers", "data"]), rng.randint(2, 9)
    doc = _sentence(rng, 8)
    body = (f"def {fname}({arg}):\n    \"\"\"{doc}\"\"\"\n    total = 0\n    for item in {arg}:\n"
            f"        total += item * {k}\n    return total\n\n\nprint({fname}([1, 2, 3]))\n")
    if broken:
        body = body.replace("):\n", ")\n", 1)  # missing colon: a SyntaxError
    return f"```python\n{body}```"


_CANONICAL_TEXTBOOK = None


def respond_textbook(rng: random.Random, mix: dict[str, float]) -> str:
    kind = _pick(rng, mix)
    if kind == "refusal":
        return "I'm sorry, but I can't help with writing that textbook section."
    if kind == "short":
        return "Lists hold values.\n\n" + _code_block(rng, False)
    if kind == "near_dup":  # one fixed section with a single word changed: near-duplicates of each other
        global _CANONICAL_TEXTBOOK
        if _CANONICAL_TEXTBOOK is None:
            _CANONICAL_TEXTBOOK = respond_textbook(_rng("canonical-textbook"), {})
        return _CANONICAL_TEXTBOOK.replace("\n\n", f"\n\n{rng.choice(_WORDS)} ", 1)
    title = " ".join(w.capitalize() for w in rng.sample(_WORDS, 3))
    text = (f"## {title}\n\n{_paragraph(rng, 4)}\n\n{_code_block(rng, kind == 'bad_code')}\n\n"
            f"{_paragraph(rng, 3)}\n")
    if kind == "boilerplate":
        text = "Sure! Here is a textbook section for you.\n\n" + text
    return text


_EX_STEPS = (
    "{new} = [x * {k} for x in {cur}]",
    "{new} = [x + {k} for x in {cur} if x % {m}]",
    "{new} = sorted({cur}, reverse={flag})",
    "{new} = {cur}[{m}:]",
    "{new} = [x // {k} for x in {cur}]",
    "{new} = [x - {k} if x > {t} else x + {t} for x in {cur}]",
)
_EX_RETURNS = ("sum({cur})", "max({cur}, default={k})", "len({cur}) * {k}", "min({cur}, default=0) + {k}")


def _exercise_code(rng: random.Random, name: str) -> tuple[str, list[str]]:
    """(function source, argument lists for asserts): a random pipeline over a list of ints, with
    random variable names, so different samples share few shingles."""
    arg = rng.choice(["values", "numbers", "items", "data", "xs"])
    cur, lines = arg, []
    for _ in range(rng.randint(2, 4)):
        new = "_".join(rng.sample(_WORDS, 2))
        lines.append(rng.choice(_EX_STEPS).format(new=new, cur=cur, k=rng.randint(2, 9), m=rng.randint(2, 5),
                                                  t=rng.randint(1, 20), flag=rng.choice([True, False])))
        cur = new
    ret = rng.choice(_EX_RETURNS).format(cur=cur, k=rng.randint(2, 9))
    doc = _sentence(rng, 10)
    src = (f"def {name}({arg}: list[int]) -> int:\n    \"\"\"{doc}\n\n    >>> {name}([1, 2, 3]) is not None\n"
           f"    True\n    \"\"\"\n" + "".join(f"    {ln}\n" for ln in lines) + f"    return {ret}\n")
    cases = [repr([rng.randint(-20, 40) for _ in range(rng.randint(0, 7))]) for _ in range(3)] + ["[]"]
    return src, cases


def respond_exercise(rng: random.Random, prompt: str, mix: dict[str, float]) -> str:
    m = re.search(r"named `(\w+)`", prompt)
    name = m.group(1) if m else "solve"
    kind = _pick(rng, mix)
    if kind == "dup":  # the same exercise every time (under the requested name)
        rng = _rng("canonical-exercise")
    src, cases = _exercise_code(rng, name)
    scope: dict[str, Any] = {}
    exec(compile(src, "<exercise>", "exec"), scope)  # our own generated code: computes the answers
    if kind == "wrong_name":
        src = src.replace(f"def {name}(", f"def {name}_v2(", 1)
    if kind == "syntax":
        src = src.replace(") ->", " ->", 1)
    if kind != "no_asserts":
        off = 1 if kind == "wrong" else 0
        src += "\n\n" + "".join(f"assert {name}({a}) == {scope[name](eval(a)) + off}\n" for a in cases)
    return f"```python\n{src}```\n"


def respond_annotate(rng: random.Random, mix: dict[str, float]) -> str:
    """An educational-value judgement as data_gen.annotate asks for it (the score is random: this
    server does not read code)."""
    kind, score = _pick(rng, mix), rng.randint(0, 10)
    reason = _sentence(rng, 10)
    if kind == "prose":
        return f"{reason} I would rate it about {score} out of 10."
    if kind == "out_of_range":
        score = rng.choice([11, 15, -1])
    answer = json.dumps({"educational_value": score, "reason": reason})
    if kind == "fenced":
        return f"```json\n{answer}\n```"
    if kind == "wrapped":
        return f"Here is my assessment:\n{answer}\nI hope this helps."
    return answer


class _State:
    """Shared, lock-protected server state."""

    def __init__(self, config: dict[str, Any]):
        self.lock = threading.Lock()
        self.config = dict(DEFAULTS)
        self.configure(config)
        self.reset()

    def configure(self, config: dict[str, Any]) -> None:
        unknown = set(config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown fake server settings: {sorted(unknown)}")
        for rule in config.get("faults", []):
            if rule.get("kind") not in FAULT_KINDS:
                raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {rule!r}")
        if config.get("responder", "auto") not in RESPONDERS:
            raise ValueError(f"responder must be one of {RESPONDERS}")
        with getattr(self, "lock", threading.Lock()):
            self.config.update(config)
            c = self.config
            self.rpm = TokenBucket(c["rpm"], c["burst_s"]) if c["rpm"] else None
            self.tpm = TokenBucket(c["tpm"], c["burst_s"]) if c["tpm"] else None

    def reset(self) -> None:
        self.by_body: collections.Counter = collections.Counter()
        self.times_by_body: dict[str, list[float]] = collections.defaultdict(list)
        self.ok_by_body: collections.Counter = collections.Counter()
        self.faults: collections.Counter = collections.Counter()
        self.requests = collections.Counter()  # by endpoint
        self.auth_missing = 0
        self.ok_tokens = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.files: dict[str, dict[str, Any]] = getattr(self, "files", {})
        self.batches: dict[str, dict[str, Any]] = getattr(self, "batches", {})

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": dict(self.requests), "by_body": dict(self.by_body),
                    "ok_by_body": dict(self.ok_by_body), "faults": dict(self.faults),
                    "times_by_body": {h: list(t) for h, t in self.times_by_body.items()},
                    "ok_tokens": self.ok_tokens, "auth_missing": self.auth_missing,
                    "max_in_flight": self.max_in_flight, "n_batches": len(self.batches),
                    "total": sum(self.requests.values())}

    def fault_for(self, body: dict, h: str, receipt: int) -> dict | None:
        text = _prompt_text(body)
        for rule in self.config["faults"]:
            if rule.get("match") is not None and rule["match"] not in text:
                continue
            if rule.get("unless") is not None and rule["unless"] in text:
                continue
            if rule.get("first") is not None and receipt >= rule["first"]:
                continue
            if rule.get("prob") is not None and _rng(self.config["seed"], h, receipt, "p").random() >= rule["prob"]:
                continue
            return rule
        return None

    def rate_check(self, cost_tokens: int) -> float | None:
        """None if admitted (charged), else seconds to wait."""
        with self.lock:
            wait = 0.0
            if self.rpm:
                wait = max(wait, self.rpm.wait_s())
            if self.tpm:
                wait = max(wait, self.tpm.wait_s())
            if wait > 0:
                return wait
            if self.rpm:
                self.rpm.take(1)
            if self.tpm:
                self.tpm.take(cost_tokens)
            return None

    def complete(self, body: dict, h: str, receipt: int, rule: dict | None) -> tuple[dict, str]:
        """(response JSON, finish_reason) for a served request."""
        c = self.config
        rng = _rng(c["seed"], h, "content")  # content depends on the body only, not the receipt
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        responder = c["responder"]
        model = str(body.get("model", ""))
        if responder == "auto":
            responder = ("textbook" if "textbook" in model else "exercises" if "exercise" in model
                         else "annotate" if "annotat" in model else "lorem")
        if rule and rule["kind"] == "reply":
            text = str(rule.get("text", ""))
        elif responder == "textbook":
            text = respond_textbook(rng, c["textbook_mix"])
        elif responder == "exercises":
            text = respond_exercise(rng, _prompt_text(body), c["exercises_mix"])
        elif responder == "annotate":
            text = respond_annotate(rng, c["annotate_mix"])
        else:
            lo, hi = c["completion_tokens"]
            text = respond_lorem(rng, rng.randint(lo, hi))
        finish = "stop"
        if (rule and rule["kind"] == "length") or estimate_tokens(text) > max_tokens:
            text, finish = text[: max(max_tokens * 4 - 8, 0)], "length"
        pt, ct = estimate_tokens(_prompt_text(body)), estimate_tokens(text)
        rid = f"{'chatcmpl' if 'messages' in body else 'cmpl'}-{h}-{receipt}"
        if "messages" in body:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return ({"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
                 "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}, finish)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-openai/1"
    state: _State  # set on the subclass per server

    def log_message(self, fmt, *args):  # quiet
        pass

    # --- plumbing -----------------------------------------------------------------
    def _read(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None,
              raw: bytes | None = None, ctype: str = "application/json") -> None:
        data = raw if raw is not None else json.dumps(payload).encode("utf-8")
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True  # the client gave up (e.g. its timeout)

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None, etype: str = "invalid_request_error"):
        self._send(code, {"error": {"message": message, "type": etype, "param": None, "code": None}}, headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:  # RST instead of FIN: the client sees a reset connection
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    # --- routes -------------------------------------------------------------------
    def do_GET(self):
        st = self.state
        path = self.path.split("?")[0]
        if path == "/_admin/stats":
            return self._send(200, st.stats())
        m = re.fullmatch(r"/v1/files/([\w-]+)(/content)?", path)
        if m:
            f = st.files.get(m.group(1))
            if f is None:
                return self._error(404, f"no file {m.group(1)}")
            if m.group(2):
                return self._send(200, None, raw=f["data"], ctype="application/octet-stream")
            return self._send(200, f["object"])
        m = re.fullmatch(r"/v1/batches/([\w-]+)", path)
        if m:
            b = st.batches.get(m.group(1))
            return self._send(200, b) if b else self._error(404, f"no batch {m.group(1)}")
        if path == "/v1/batches":
            with st.lock:
                data = sorted(st.batches.values(), key=lambda b: b["created_at"], reverse=True)
            return self._send(200, {"object": "list", "data": data, "has_more": False,
                                    "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None})
        self._error(404, f"unknown route GET {path}")

    def do_POST(self):
        st = self.state
        path = self.path.split("?")[0]
        raw = self._read()
        if path == "/_admin/config":
            try:
                st.configure(json.loads(raw or b"{}"))
            except ValueError as e:
                return self._error(400, str(e))
            return self._send(200, {"ok": True})
        if path == "/_admin/reset":
            with st.lock:
                st.reset()
            return self._send(200, {"ok": True})
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            with st.lock:
                st.auth_missing += 1
            return self._error(401, "missing API key", etype="invalid_api_key")
        if st.config["api_key"] is not None and auth[len("Bearer "):] != st.config["api_key"]:
            with st.lock:
                st.requests["rejected:401"] += 1
            return self._error(401, f"Incorrect API key provided: {auth[len('Bearer '):]}.", etype="invalid_api_key")
        if path in ("/v1/chat/completions", "/v1/completions"):
            return self._completion(path, raw)
        if path == "/v1/files":
            return self._upload(raw)
        if path == "/v1/batches":
            return self._create_batch(raw)
        m = re.fullmatch(r"/v1/batches/([\w-]+)/cancel", path)
        if m and m.group(1) in st.batches:
            st.batches[m.group(1)]["status"] = "cancelled"
            return self._send(200, st.batches[m.group(1)])
        self._error(404, f"unknown route POST {path}")

    def _completion(self, path: str, raw: bytes) -> None:
        st = self.state
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or ("messages" not in body and "prompt" not in body):
                raise ValueError("need messages or prompt")
        except ValueError as e:
            return self._error(400, f"bad request body: {e}")
        if st.config["models"] is not None and body.get("model") not in st.config["models"]:
            with st.lock:
                st.requests["rejected:404"] += 1
            return self._error(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                               etype="model_not_found")
        h = body_hash(body)
        with st.lock:
            receipt = st.by_body[h]
            st.by_body[h] += 1
            st.times_by_body[h].append(time.monotonic())
            st.requests[path] += 1
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            rule = st.fault_for(body, h, receipt)
            if rule:
                st.faults[rule["kind"]] += 1
            lo, hi = st.config["latency"]
        try:
            self._serve_completion(body, h, receipt, rule, lo, hi)
        finally:
            with st.lock:
                st.in_flight -= 1

    def _serve_completion(self, body, h, receipt, rule, lo, hi) -> None:
        st = self.state
        kind = rule["kind"] if rule else None
        if kind == "429":
            ra = rule.get("retry_after", 1.0)
            return self._error(429, "Rate limit reached (injected)", {"Retry-After": f"{ra:g}"}, "requests")
        if kind in ("500", "502", "503"):
            return self._error(int(kind), "The server had an error (injected)", etype="server_error")
        if kind == "400":  # what a careless proxy does: echo the credentials
            return self._error(400, f"Invalid request for key {self.headers.get('Authorization')}")
        if kind == "403":
            return self._error(403, "You are not allowed to sample from this model", etype="permission_denied")
        if kind == "drop":
            return self._drop()
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        reserve = estimate_tokens(_prompt_text(body)) + max_tokens
        wait = st.rate_check(reserve)
        if wait is not None:
            with st.lock:
                st.faults["rate_limited"] += 1
            return self._error(429, "Rate limit reached (server limit)", {"Retry-After": f"{wait:.3f}"}, "requests")
        delay = _rng(st.config["seed"], h, receipt, "lat").uniform(lo, hi)
        if kind in ("timeout", "slow"):
            delay += rule.get("delay", 5.0)
        time.sleep(delay)
        if kind == "timeout":  # the client has given up by now
            with st.lock:
                st.tpm and st.tpm.give(reserve)
            return self._drop()
        if kind == "malformed":
            return self._send(200, None, raw=b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind')
        if kind == "no_choices":
            return self._send(200, {"id": "chatcmpl-x", "object": "chat.completion", "choices": []})
        resp, _ = st.complete(body, h, receipt, rule)
        used = resp["usage"]["total_tokens"]
        with st.lock:
            if st.tpm:
                st.tpm.give(reserve - used)
            st.ok_by_body[h] += 1
            st.ok_tokens += used
        self._send(200, resp)

    def _upload(self, raw: bytes) -> None:
        st = self.state
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + self.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + raw)
        fields, data, filename = {}, None, "upload.jsonl"
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                data = part.get_payload(decode=True)
                filename = part.get_filename() or filename
            else:
                fields[name] = part.get_content().strip()
        if data is None or "purpose" not in fields:
            return self._error(400, "multipart upload needs 'file' and 'purpose'")
        fid = f"file-{uuid.uuid4().hex[:24]}"
        obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": fields["purpose"], "status": "processed"}
        with st.lock:
            st.files[fid] = {"object": obj, "data": data}
            st.requests["/v1/files"] += 1
        self._send(200, obj)

    def _create_batch(self, raw: bytes) -> None:
        st = self.state
        req = json.loads(raw or b"{}")
        if req.get("input_file_id") not in st.files:
            return self._error(400, f"no input file {req.get('input_file_id')!r}")
        bid = f"batch_{uuid.uuid4().hex[:24]}"
        now = time.time()
        b = {"id": bid, "object": "batch", "endpoint": req.get("endpoint"), "errors": None,
             "input_file_id": req["input_file_id"], "completion_window": req.get("completion_window", "24h"),
             "status": "validating", "output_file_id": None, "error_file_id": None,
             "created_at": int(now), "in_progress_at": None, "completed_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0},
             "metadata": req.get("metadata"), "_created": now}
        with st.lock:
            st.batches[bid] = b
            st.requests["/v1/batches"] += 1
        threading.Thread(target=self._run_batch, args=(bid,), daemon=True).start()
        self._send(200, {k: v for k, v in b.items() if not k.startswith("_")})

    def _run_batch(self, bid: str) -> None:
        st = self.state
        b = st.batches[bid]
        b["status"], b["in_progress_at"] = "in_progress", int(time.time())
        out_lines, err_lines = [], []
        lines = st.files[b["input_file_id"]]["data"].decode("utf-8").splitlines()
        for line in lines:
            item = json.loads(line)
            body = item["body"]
            h = body_hash(body)
            with st.lock:
                receipt = st.by_body[h]
                st.by_body[h] += 1
                st.requests["batch:" + item["url"]] += 1
                rule = st.fault_for(body, h, receipt)
                if rule:
                    st.faults[rule["kind"]] += 1
            kind = rule["kind"] if rule else None
            rid = f"batch_req_{uuid.uuid4().hex[:12]}"
            if kind == "expire":
                continue
            if kind in ("429", "500", "502", "503", "400", "403", "timeout", "drop"):
                code = {"timeout": 500, "drop": 500}.get(kind, int(kind) if kind.isdigit() else 500)
                err_lines.append({"id": rid, "custom_id": item["custom_id"], "response": {
                    "status_code": code, "request_id": rid,
                    "body": {"error": {"message": f"injected {kind}", "type": "server_error"}}}, "error": None})
                continue
            if kind in ("malformed", "no_choices"):  # a 200 line without a usable completion
                out_lines.append({"id": rid, "custom_id": item["custom_id"], "error": None, "response": {
                    "status_code": 200, "request_id": rid, "body": {"id": "chatcmpl-x", "choices": []}}})
                continue
            resp, _ = st.complete(body, h, receipt, rule)
            with st.lock:
                st.ok_by_body[h] += 1
                st.ok_tokens += resp["usage"]["total_tokens"]
            out_lines.append({"id": rid, "custom_id": item["custom_id"],
                              "response": {"status_code": 200, "request_id": rid, "body": resp}, "error": None})
        time.sleep(st.config["batch_delay_s"])
        for name, rows in (("output_file_id", out_lines), ("error_file_id", err_lines)):
            if rows:
                fid = f"file-{uuid.uuid4().hex[:24]}"
                data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
                st.files[fid] = {"data": data, "object": {
                    "id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                    "filename": f"{bid}_{name}.jsonl", "purpose": "batch_output", "status": "processed"}}
                b[name] = fid
        b["request_counts"] = {"total": len(lines), "completed": len(out_lines), "failed": len(err_lines)}
        b["status"], b["completed_at"] = "completed", int(time.time())


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # listen backlog: bursts of new connections are not refused

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away (killed, timed out): expected in fault tests
        super().handle_error(request, client_address)


class FakeOpenAIServer:
    """The server on a background thread: ``with FakeOpenAIServer(latency=(0.1, 0.2)) as s: s.base_url``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any):
        self.state = _State(config)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = _HTTPServer((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def configure(self, **config: Any) -> None:
        self.state.configure(config)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def reset_stats(self) -> None:
        with self.state.lock:
            self.state.reset()


def admin(base_url: str, what: str, payload: dict | None = None) -> dict:
    """Talks to a server in another process: admin(url, 'stats') / ('config', {...}) / ('reset')."""
    root = base_url.rsplit("/v1", 1)[0]
    data = None if what == "stats" else json.dumps(payload or {}).encode()
    req = urllib.request.Request(f"{root}/_admin/{what}", data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, nargs=2, default=(0.0, 0.0), metavar=("LO", "HI"))
    p.add_argument("--completion_tokens", type=int, nargs=2, default=(40, 120), metavar=("LO", "HI"))
    p.add_argument("--rpm", type=float)
    p.add_argument("--tpm", type=float)
    p.add_argument("--burst_s", type=float, default=2.0)
    p.add_argument("--responder", choices=RESPONDERS, default="auto")
    p.add_argument("--faults", default="[]", help="JSON list of fault rules")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the fake server binds to loopback only")
    srv = FakeOpenAIServer(a.host, a.port, latency=tuple(a.latency), completion_tokens=tuple(a.completion_tokens),
                           rpm=a.rpm, tpm=a.tpm, burst_s=a.burst_s, responder=a.responder,
                           faults=json.loads(a.faults), seed=a.seed)
    print(f"listening on {srv.base_url}", flush=True)
    try:
        srv.httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
