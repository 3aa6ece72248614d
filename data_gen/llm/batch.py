"""The Batch API path (half price, results within the completion window).

Per round: the pending requests are written as JSONL ({"custom_id": key, "method": "POST",
"url": endpoint, "body": ...}) to ``<out>/batches/<tag>.jsonl``, uploaded (purpose "batch"),
and submitted as a batch tagged ``metadata={"data_gen_tag": tag}``; every step is recorded in
the ledger first (preparing → uploaded → submitted), so a killed run finds its batches again
instead of paying for them twice: an uploaded-but-unrecorded batch is looked up on the server
by its tag. Batches are polled until terminal, their output and error files downloaded, and
each line reconciled by custom_id into responses.jsonl (cost × 0.5). Requests that failed
retryably (429, 5xx, a malformed 200 body: charged at its worst case) or are missing from the
output (expired) are resubmitted in the next round, up to ``batch_max_rounds``; other failures
are recorded. A 401 / 403 / 404 from the Files or Batch API stops the run (``EndpointError``).

`engine` below is the running `data_gen.llm.engine.Engine` (its config, ledger state, backoff and
error mapping); engine.py dispatches here, so this module does not import it.

Budget: a batch reserves the worst case of all its requests before it is uploaded; requests
that do not fit wait for a later run with a larger cap.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from typing import Any, Iterable

from data_gen.llm import cost as cost_lib
from data_gen.llm import ledger as ledger_lib
from data_gen.llm import retry as retry_lib
from data_gen.llm.outcome import Outcome, Progress, RunReport, parse_completion
from data_gen.llm.request import Request
from phijax.util.files import atomic_write_bytes

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled")
BATCH_DIR = "batches"


async def _with_retries(engine, what: str, fn, *args, **kwargs):
    """Batch API calls retried on 429/5xx/network like online requests."""
    import openai

    rng = random.Random(what)
    for attempt in range(engine.cfg.max_attempts):
        try:
            return await fn(*args, **kwargs)
        except openai.APIStatusError as e:
            if e.status_code in ledger_lib.CONFIG_STATUS:
                raise engine.endpoint_error(e.status_code, f"HTTP {e.status_code}: {e.message}",
                                            engine.cfg.model) from None
            if not retry_lib.is_retryable_status(e.status_code) or attempt + 1 == engine.cfg.max_attempts:
                raise
            ra = retry_lib.parse_retry_after(e.response.headers)
        except openai.APIConnectionError:
            if attempt + 1 == engine.cfg.max_attempts:
                raise
            ra = None
        await asyncio.sleep(engine.backoff.delay(attempt, ra, rng))


class _BatchRun:
    def __init__(self, engine, requests: Iterable[Request], total: int | None):
        self.e = engine
        self.cfg = engine.cfg
        self.report = RunReport()
        self.led, self.results, self.done = engine.open_state(self.report)
        self.permanent = set() if self.cfg.retry_failed else self.led.permanent_failures()
        self.budget = cost_lib.Budget(self.cfg.budget_usd, self.led.spent())
        self.todo: dict[str, Request] = {}
        for req in requests:
            k = req.key
            if k in self.todo:
                self.report.n_duplicate_requests += 1
                continue
            self.report.n_requests += 1
            if k in self.done:
                self.report.n_already_done += 1
            elif k in self.permanent:
                self.report.n_skipped_failed += 1
            else:
                engine.check_prices([req.model])
                self.todo[k] = req
        self.progress = Progress(len(self.todo), self.cfg.progress, desc="batch")

    # --- submit ---------------------------------------------------------------------
    async def submit(self, reqs: list[Request], round_: int) -> dict[str, Any] | None:
        reserved = 0.0
        fitting: list[Request] = []
        for r in reqs:
            usd = self.e.worst_case(r, batch=True)[1]
            if not self.budget.try_reserve(usd):
                self.report.stopped = "budget"
                break
            reserved += usd
            fitting.append(r)
        if not fitting:
            return None
        tag = f"r{round_}-{uuid.uuid4().hex[:12]}"
        data = "".join(json.dumps({"custom_id": r.key, "method": "POST", "url": r.endpoint, "body": r.body()},
                                  ensure_ascii=False) + "\n" for r in fitting).encode("utf-8")
        path = self.e.out_dir / BATCH_DIR / f"{tag}.jsonl"
        atomic_write_bytes(path, data)
        self.led.batch_begin(tag, [(r.key, r.sample_index) for r in fitting], round_, reserved)
        f = await _with_retries(self.e, tag, self.e.client.files.create, file=(path.name, data), purpose="batch")
        self.led.batch_update(tag, input_file_id=f.id, state="uploaded")
        row = {"tag": tag, "input_file_id": f.id, "state": "uploaded", "reserved": reserved, "n": len(fitting),
               "batch_id": None}
        await self.create(row, fitting[0].endpoint)
        log.info("batch %s: %d requests submitted (%s), worst case $%.4f", tag, len(fitting), row["batch_id"], reserved)
        return row

    async def create(self, row: dict[str, Any], endpoint: str) -> None:
        b = await _with_retries(self.e, row["tag"], self.e.client.batches.create,
                                input_file_id=row["input_file_id"], endpoint=endpoint,
                                completion_window=self.cfg.batch_completion_window,
                                metadata={"data_gen_tag": row["tag"]})
        self.led.batch_update(row["tag"], batch_id=b.id, state="submitted")
        row.update(batch_id=b.id, state="submitted")

    async def adopt(self, row: dict[str, Any]) -> bool:
        """Resumes a batch recorded by a killed run; False if it never reached the server."""
        if row["state"] == "preparing":  # nothing was created from it: its requests go back
            for key, _ in self.led.batch_keys(row["tag"]):
                self.led.release(key)
            self.led.batch_update(row["tag"], state="abandoned")
            return False
        if row["batch_id"] is None:  # uploaded; was the batch created before the kill?
            async for b in self.e.client.batches.list(limit=100):
                if (b.metadata or {}).get("data_gen_tag") == row["tag"] or b.input_file_id == row["input_file_id"]:
                    self.led.batch_update(row["tag"], batch_id=b.id, state="submitted")
                    row.update(batch_id=b.id, state="submitted")
                    break
            else:
                keys = self.led.batch_keys(row["tag"])
                endpoint = self.todo[keys[0][0]].endpoint if keys and keys[0][0] in self.todo else "/v1/chat/completions"
                await self.create(row, endpoint)
        self.budget.reserved += row["reserved"] or 0.0
        self.budget.n_reserved += row["n"] or 0
        return True

    # --- collect --------------------------------------------------------------------
    async def wait(self, row: dict[str, Any]):
        while True:
            b = await _with_retries(self.e, row["tag"], self.e.client.batches.retrieve, row["batch_id"])
            if b.status in TERMINAL:
                return b
            await asyncio.sleep(self.cfg.batch_poll_s)

    async def download(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        content = await _with_retries(self.e, file_id, self.e.client.files.content, file_id)
        return [json.loads(line) for line in content.content.decode("utf-8").splitlines() if line.strip()]

    async def collect(self, row: dict[str, Any]) -> None:
        b = await self.wait(row)
        lines = await self.download(b.output_file_id) + await self.download(b.error_file_id)
        keys = dict(self.led.batch_keys(row["tag"]))
        seen = set()
        for item in lines:
            key = item.get("custom_id")
            if key not in keys or key in seen or key in self.done:
                continue
            seen.add(key)
            req = self.todo.get(key)
            resp = item.get("response") or {}
            code = resp.get("status_code")
            out = parse_completion(req.kind, resp.get("body")) if code == 200 and req is not None else None
            if out is not None and out.status != "malformed":
                self.record(req, out)
            elif out is not None:  # served but unusable: charged at its worst case, resubmitted
                usd = self.e.worst_case(req, batch=True)[1]
                self.led.charge(key, usd, "malformed")
                self.budget.spent += usd
                self.report.spent_usd += usd
                self.led.mark_failed(key, keys[key], 200, self.e.redact(f"batch {row['batch_id']}: {out.error}"), True,
                                     "malformed")
                self.report.retries_by_reason["batch_malformed"] += 1
            else:
                err = item.get("error") or (resp.get("body") or {}).get("error") or {}
                msg = self.e.redact(f"batch {row['batch_id']}: HTTP {code}: {err.get('message', err)}")
                retryable = code is None or retry_lib.is_retryable_status(int(code))
                self.led.mark_failed(key, keys[key], code, msg, retryable)
                self.report.retries_by_reason[f"batch_{code}"] += 1
        missing = [k for k in keys if k not in seen and k not in self.done]
        for k in missing:  # expired or dropped: try again next round
            self.led.mark_failed(k, keys[k], None, f"batch {row['batch_id']} ({b.status}): no result", True)
        if missing:
            self.report.retries_by_reason["batch_missing"] += len(missing)
        self.budget.settle(row["reserved"] or 0.0, 0.0, row["n"] or 0)  # record() added the actual costs
        self.led.batch_update(row["tag"], state="reconciled")
        log.info("batch %s (%s): %s; %d results, %d errors, %d missing", row["tag"], row["batch_id"], b.status,
                 sum(1 for i in lines if (i.get("response") or {}).get("status_code") == 200),
                 len(seen) - sum(1 for i in lines if (i.get("response") or {}).get("status_code") == 200), len(missing))

    def record(self, req: Request, out: Outcome) -> None:
        usd = self.e.settle_usage(req, out, batch=True)
        self.e.write_result(self.results, self.led, req, out, usd, "batch", 1)
        self.done.add(req.key)
        self.budget.spent += usd
        self.report.count_result(out, usd)
        self.progress.update((out.prompt_tokens or 0) + (out.completion_tokens or 0), self.budget.spent)

    # --- rounds ---------------------------------------------------------------------
    async def run(self) -> RunReport:
        t0 = time.monotonic()
        try:
            live = [row for row in self.led.open_batches() if await self.adopt(row)]
            if live:
                log.info("resuming %d batch(es) of an earlier run", len(live))
                await asyncio.gather(*(self.collect(row) for row in live))
            for round_ in range(self.cfg.batch_max_rounds):
                permanent = self.led.permanent_failures()
                pending = [r for k, r in self.todo.items() if k not in self.done and k not in permanent]
                if not pending or self.report.stopped:
                    break
                by_endpoint: dict[str, list[Request]] = {}
                for r in pending:
                    by_endpoint.setdefault(r.endpoint, []).append(r)
                rows = []
                n = self.cfg.batch_max_requests
                for reqs in by_endpoint.values():
                    for i in range(0, len(reqs), n):
                        if self.report.stopped:
                            break
                        row = await self.submit(reqs[i:i + n], round_)
                        if row:
                            rows.append(row)
                await asyncio.gather(*(self.collect(row) for row in rows))
            left = [k for k in self.todo if k not in self.done]
            failed = {k for (k, *_rest) in self.led.failures(limit=10**9)}
            self.report.n_failed = sum(1 for k in left if k in failed)
            self.report.n_not_sent = len(left) - self.report.n_failed
        finally:
            self.progress.close()
            await self.e.finish(self.report, self.led, self.results)
        self.report.elapsed_s = time.monotonic() - t0
        log.info("%s", self.report.summary())
        return self.report


async def run_batch(engine, requests: Iterable[Request], total: int | None = None) -> RunReport:
    return await _BatchRun(engine, requests, total).run()
