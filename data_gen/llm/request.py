"""A generation request, its ledger key, and the tokenizer-free token estimate.

The key is sha256 over the canonical JSON of (model, kind, messages or prompt, sampling
parameters, sample index): the same request always maps to the same key, so a resumed run
recognises completed work, and two samples of one prompt (sample_index 0, 1, ...) are distinct.
``meta`` (e.g. the generator's recorded random choices) travels with the result but is not part
of the key.

Token estimate: ceil(UTF-8 bytes / 4) per text plus 4 per chat message (role and separators),
the usual rule of thumb for GPT-style BPEs on English and code. It only sizes rate-limit and
budget reservations; reported usage replaces it once a response arrives. Pass a
``tokenizers`` tokenizer.json (``TokenCounter(tokenizer_file=...)``) for exact counts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping

KINDS = ("chat", "completion")
# Sampling parameters the engine passes as keyword arguments; anything else goes in extra_body.
KNOWN_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty",
                "frequency_penalty", "n", "logit_bias", "max_completion_tokens")
MESSAGE_OVERHEAD_TOKENS = 4


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class Request:
    """One sample to generate. ``messages`` for kind='chat', ``prompt`` for kind='completion'."""

    model: str
    sample_index: int
    kind: str = "chat"
    messages: tuple[Mapping[str, str], ...] | None = None
    prompt: str | None = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"request kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"request model must be a non-empty string, got {self.model!r}")
        if self.kind == "chat":
            if not self.messages or not all(isinstance(m, Mapping) and isinstance(m.get("content"), str)
                                            and isinstance(m.get("role"), str) for m in self.messages):
                raise ValueError("a chat request needs messages [{'role': str, 'content': str}, ...]")
            object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
        elif not isinstance(self.prompt, str):
            raise ValueError("a completion request needs a string prompt")
        mt = self.params.get("max_tokens", self.params.get("max_completion_tokens"))
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise ValueError(f"request params need max_tokens (int >= 1) to bound cost, got {mt!r}")
        if self.params.get("n", 1) != 1:
            raise ValueError("use one request per sample (sample_index), not n > 1")

    @property
    def max_tokens(self) -> int:
        return int(self.params.get("max_tokens", self.params.get("max_completion_tokens")))

    def key_fields(self) -> dict[str, Any]:
        body = {"messages": list(self.messages)} if self.kind == "chat" else {"prompt": self.prompt}
        return {"model": self.model, "kind": self.kind, **body, "params": dict(self.params),
                "sample_index": int(self.sample_index)}

    @property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.key_fields()).encode("utf-8")).hexdigest()[:32]

    def body(self) -> dict[str, Any]:
        """The JSON body sent to /v1/chat/completions or /v1/completions."""
        content = {"messages": list(self.messages)} if self.kind == "chat" else {"prompt": self.prompt}
        return {"model": self.model, **content, **dict(self.params)}

    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"


def seed_from_key(key_material: str) -> int:
    """A 31-bit sampling seed derived from text (stable across runs and machines)."""
    return int(hashlib.sha256(key_material.encode("utf-8")).hexdigest()[:8], 16) & 0x7FFFFFFF


class TokenCounter:
    """Counts prompt tokens: the bytes/4 estimate, or exactly with a tokenizer.json file."""

    def __init__(self, tokenizer_file: str | None = None):
        self._tok = None
        if tokenizer_file:
            from tokenizers import Tokenizer  # core dependency of phijax
            self._tok = Tokenizer.from_file(str(tokenizer_file))

    def text(self, s: str) -> int:
        if self._tok is not None:
            return len(self._tok.encode(s, add_special_tokens=False).ids)
        return estimate_tokens(s)

    def prompt(self, req: Request) -> int:
        if req.kind == "chat":
            return sum(self.text(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in req.messages)
        return self.text(req.prompt)


def estimate_tokens(s: str) -> int:
    """The tokenizer-free estimate (also what the loopback test server reports as usage)."""
    return math.ceil(len(s.encode("utf-8")) / 4)


def messages_from(system: str | None, user: str) -> tuple[dict[str, str], ...]:
    return tuple(([{"role": "system", "content": system}] if system else []) +
                 [{"role": "user", "content": user}])


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keyword arguments the openai client knows, the rest for extra_body)."""
    known = {k: v for k, v in params.items() if k in KNOWN_PARAMS}
    extra = {k: v for k, v in params.items() if k not in KNOWN_PARAMS}
    return known, extra


