"""Completions from any OpenAI-compatible endpoint (vLLM, TGI, llama.cpp server, OpenAI, ...), for
`evaluate.endpoint`: a sampler with `decode.Sampler.complete`'s signature, so the evaluation
pipeline (prompts, stop sequences, sampling settings, sandbox scoring) is the same as a local model's.

* api 'completions' (base models): the prompt as is; `stop` is sent and also cut client-side.
* api 'chat' (chat models): the prompt as one user message; the same stop sequences, sent and cut.
* A prompt whose max_new_tokens do not fit beside it in the endpoint's context (HTTP 400
  context_length_exceeded) generates what fits, as model mode does, where the endpoint states its
  context in /v1/models (`max_model_len`: vLLM, phijax.serve): its prompt tokens come from the
  `usage` of a 1-token request. Elsewhere the 400 stops the run, naming the prompt.

The API key comes from OPENAI_API_KEY only; it is never logged nor written, and error messages have
it redacted. The `openai` client is imported only here, when an endpoint is used.
"""
from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from typing import Sequence

log = logging.getLogger("phijax.evaluate")

APIS = {"completions": "the prompt as is (a base model)", "chat": "the prompt as one user message (a chat model)"}


class EndpointError(ValueError):
    """The endpoint cannot serve this evaluation (unreachable, unknown model, rejected key...)."""


def public_url(url: str) -> str:
    """The URL without credentials (user:password@) nor query string."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((p.scheme, netloc + (f":{p.port}" if p.port else ""), p.path, "", ""))


def check(endpoint, model, api, concurrency) -> list[str]:
    """The problems with these settings (nothing contacted)."""
    problems = []
    p = urllib.parse.urlsplit(endpoint) if isinstance(endpoint, str) else None
    if p is None or p.scheme not in ("http", "https") or not p.netloc:
        problems.append(f"endpoint={endpoint!r} must be an http(s) URL such as 'http://localhost:8000/v1'")
    if not isinstance(model, str) or not model:
        problems.append(f"endpoint_model={model!r}: name the endpoint's model (e.g. 'phi-1')")
    if api not in APIS:
        problems.append(f"endpoint_api={api!r} must be one of {sorted(APIS)}")
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        problems.append(f"endpoint_concurrency={concurrency!r} must be a positive int")
    return problems


class EndpointSampler:
    """`complete()` as `decode.Sampler` has it, answered by the endpoint, `concurrency` requests at a
    time. Sample j of every prompt is requested with seed `seed + j`."""

    def __init__(self, endpoint: str, model: str, *, api: str = "completions", concurrency: int = 8,
                 request_timeout_s: float = 600.0, max_retries: int = 2):
        self.endpoint, self.model, self.api, self.concurrency = endpoint, model, api, concurrency
        self.url = public_url(endpoint)
        self._key = os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers take any key
        self._timeout, self._retries = request_timeout_s, max_retries

    def _client(self, *, timeout: float, max_retries: int):
        import openai
        return openai.AsyncOpenAI(base_url=self.endpoint, api_key=self._key, timeout=timeout,
                                  max_retries=max_retries)

    def _redact(self, text: str) -> str:
        text = str(text).replace(self.endpoint, self.url)
        return text.replace(self._key, "***") if self._key != "EMPTY" else text

    async def _one(self, client, prompt: str, *, seed: int, stop, usage: bool = False, **sampling):
        """The completion's text (and with usage=True the response's usage)."""
        if self.api == "chat":
            r = await client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                                     seed=seed, stop=stop, **sampling)
            text = r.choices[0].message.content if r.choices else None
        else:
            r = await client.completions.create(model=self.model, prompt=prompt, seed=seed, stop=stop, **sampling)
            text = r.choices[0].text if r.choices else None
        if text is None:
            raise EndpointError(f"{self.url} answered without a completion (model {self.model!r})")
        return (text, r.usage) if usage else text

    async def _context_length(self, client) -> int | None:
        """The model's context as /v1/models states it (`max_model_len`), or None."""
        try:
            page = await client.models.list()
        except Exception:  # noqa: BLE001 - a server without /v1/models: unknown
            return None
        for m in page.data:
            n = (getattr(m, "model_extra", None) or {}).get("max_model_len")
            if m.id == self.model and isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
        return None

    @staticmethod
    def _context_exceeded(e: Exception) -> bool:
        import openai
        if not isinstance(e, openai.BadRequestError):
            return False
        return e.code == "context_length_exceeded" or "maximum context length" in str(e.message).lower()

    def _error(self, e: Exception, what: str) -> EndpointError:
        import openai
        if isinstance(e, openai.APITimeoutError):
            why = "timed out"
        elif isinstance(e, openai.APIConnectionError):
            why = f"is unreachable ({e.__cause__ or e})"
        elif isinstance(e, openai.AuthenticationError):
            why = "rejected the API key (set OPENAI_API_KEY)"
        elif isinstance(e, openai.NotFoundError):
            why = f"has no model {self.model!r} or no /{'chat/' if self.api == 'chat' else ''}completions route (404)"
        elif isinstance(e, openai.APIStatusError):
            why = f"answered HTTP {e.status_code}: {e.message}"
            if self._context_exceeded(e):
                why += (" (it states no context length, `max_model_len`, in /v1/models, so the completion cannot be "
                        "fitted to it: lower evaluate.max_new_tokens)")
        else:
            why = f"failed: {type(e).__name__}: {e}"
        return EndpointError(self._redact(f"endpoint {self.endpoint} (evaluate.endpoint_api={self.api!r}) {why} "
                                          f"{what}").replace("\n", " "))

    def probe(self) -> None:
        """One tiny request (1 token, no retries): raises EndpointError naming what is wrong."""
        async def go():
            client = self._client(timeout=min(self._timeout, 30.0), max_retries=0)
            try:
                await self._one(client, "def", seed=0, stop=None, max_tokens=1, temperature=0.0)
            finally:
                await client.close()
        try:
            asyncio.run(go())
        except EndpointError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure of the probe is the endpoint's
            raise self._error(e, "(probe request)") from None

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, top_p: float,
                 num_samples: int, seed: int, stop: Sequence[str] = (), fit_context: bool = True) -> list[list[str]]:
        from phijax.decode import cut_at_stop
        sampling = dict(temperature=temperature, top_p=top_p)
        room: dict[int, asyncio.Future] = {}  # prompt -> the new tokens that fit beside it (fit_context)
        context: list[asyncio.Future] = []  # the endpoint's context length (or None), asked once

        async def fit(client, i) -> int | None:
            if not context:
                context.append(asyncio.ensure_future(self._context_length(client)))
            limit = await context[0]
            if limit is None:
                return None
            _, usage = await self._one(client, prompts[i], seed=0, stop=None, usage=True, max_tokens=1, **sampling)
            n = getattr(usage, "prompt_tokens", None)
            return limit - n if isinstance(n, int) and limit - n >= 1 else None

        async def go():
            client = self._client(timeout=self._timeout, max_retries=self._retries)
            gate = asyncio.Semaphore(self.concurrency)

            async def ask(i, j, max_tokens):
                return await self._one(client, prompts[i], seed=seed + j, stop=list(stop) or None,
                                       max_tokens=max_tokens, **sampling)

            async def one(i, j):
                async with gate:
                    try:
                        try:
                            text = await ask(i, j, max_new_tokens)
                        except Exception as e:  # noqa: BLE001
                            if not (fit_context and self._context_exceeded(e)):
                                raise
                            if i not in room:
                                room[i] = asyncio.ensure_future(fit(client, i))
                            n = await room[i]
                            if n is None:
                                raise
                            text = await ask(i, j, n)
                    except EndpointError:
                        raise
                    except Exception as e:  # noqa: BLE001
                        raise self._error(e, f"(prompt {i}, sample {j})") from None
                return cut_at_stop(text, stop)[0]
            try:
                return await asyncio.gather(*(one(i, j) for i in range(len(prompts)) for j in range(num_samples)))
            finally:
                await client.close()

        log.info("requesting %d x %d completions from %s (model %s, %s API, %d at a time)", len(prompts),
                 num_samples, self.url, self.model, self.api, self.concurrency)
        flat = asyncio.run(go())
        if room:
            fits = sorted(f.result() for f in room.values())
            log.info("max_new_tokens=%d does not fit beside %d of %d prompts in the endpoint's context "
                     "(max_model_len=%d): those generate at most max_model_len - prompt tokens (%d to %d new tokens)",
                     max_new_tokens, len(room), len(prompts), context[0].result(), fits[0], fits[-1])
        return [flat[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
