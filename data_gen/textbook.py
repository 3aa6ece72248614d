"""Synthetic "textbook" sections (phi-1's <1B tokens of GPT-3.5 textbooks): prose interleaved
with Python, made diverse by random constraints in the prompt.

    python -m data_gen.textbook --gin_file=gin/data/textbook.gin --out_dir=/data/textbook
    python -m data_gen.textbook --gin_file=gin/data/textbook.gin --out_dir=... --dry_run

Sample i draws (topic, subtopic, audience, style) from the lists file with a generator seeded
by (seed, i), fills the prompt templates (gin/data/textbook_*.txt) and records the choices in
its metadata. Each response is validated (``validate``): served complete (not cut off or
malformed), long enough, no refusal or boilerplate opening, at least ``min_code_blocks`` fenced
```python blocks (untagged fences often hold output, so they are not parsed), each of which parses. Survivors are near-deduplicated with MinHash in sample order (the first
of a cluster is kept). Shards: ``shards/textbook-*.jsonl``, one record per section::

    {"text": "...", "id": key, "sample_index": 17, "topic": "...", "subtopic": "...",
     "audience": "...", "style": "...", "model": "...", "seed": 0, "n_code_blocks": 2}

Rejects (``rejects.jsonl``) keep the text and the reason: not_served_ok:<status>, too_short,
refusal, boilerplate_opening, no_code, code_syntax_error, near_duplicate.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import sys
from typing import Any, Sequence

import gin

from data_gen import generator
from data_gen.llm.request import Request
from data_gen.text_blocks import python_blocks

TEMPLATE_FIELDS = ("topic", "subtopic", "audience", "style")

DEFAULT_REFUSALS = (r"i'?m sorry", r"i am sorry", r"i cannot", r"i can'?t", r"as an ai", r"i'?m unable",
                    r"i am unable", r"unfortunately,? i")
DEFAULT_BOILERPLATE = (r"sure[!,.]", r"certainly[!,.]", r"of course[!,.]", r"here(?:'s| is) (?:a|an|the|your)\b",
                       r"absolutely[!,.]", r"great question")


@gin.configurable(module="data_gen")
@dataclasses.dataclass
class TextbookConfig(generator.SamplingConfig):
    lists_file: str = "gin/data/textbook_topics.json"
    system_template_file: str | None = "gin/data/textbook_system.txt"
    prompt_template_file: str = "gin/data/textbook_prompt.txt"
    max_tokens: int = 1500
    min_chars: int = 800
    min_code_blocks: int = 1
    # Keep a section the server cut off at max_tokens (status "length") instead of rejecting it:
    # off for real runs; the CPU demo's tiny teacher never ends a section by itself.
    keep_cut_off: bool = False
    refusal_patterns: Sequence[str] = DEFAULT_REFUSALS
    boilerplate_patterns: Sequence[str] = DEFAULT_BOILERPLATE

    def validate(self) -> None:
        super().validate()
        if self.min_chars < 0:
            raise generator.GeneratorError(f"min_chars must be >= 0, got {self.min_chars}")
        for pat in (*self.refusal_patterns, *self.boilerplate_patterns):
            try:
                re.compile(pat)
            except re.error as e:
                raise generator.GeneratorError(f"bad pattern {pat!r}: {e}") from None


def choose(cfg: TextbookConfig, lists: dict[str, Any], index: int) -> dict[str, str]:
    rng = generator.sample_rng(cfg.seed, index, "textbook")
    topic = rng.choice(sorted(lists["topics"]))
    return {"topic": topic, "subtopic": rng.choice(lists["topics"][topic]),
            "audience": rng.choice(lists["audiences"]), "style": rng.choice(lists["styles"])}


def build_requests(cfg: TextbookConfig, model: str) -> list[Request]:
    cfg.validate()
    lists = generator.load_lists(cfg.lists_file, {"topics": dict, "audiences": list, "styles": list})
    return generator.build_chat_requests(cfg, model, TEMPLATE_FIELDS, lambda i: choose(cfg, lists, i))


def validate(text: str, cfg: TextbookConfig) -> tuple[str, str] | None:
    """(reason, detail) if the section is unusable, else None."""
    head = text.lstrip()[:200].lower()
    for pat in cfg.refusal_patterns:
        if re.match(pat, head):
            return "refusal", head[:80]
    for pat in cfg.boilerplate_patterns:
        if re.match(pat, head):
            return "boilerplate_opening", head[:80]
    if len(text.strip()) < cfg.min_chars:
        return "too_short", f"{len(text.strip())} < {cfg.min_chars} chars"
    blocks = python_blocks(text)
    if len(blocks) < cfg.min_code_blocks:
        return "no_code", f"{len(blocks)} python block(s) < {cfg.min_code_blocks}"
    for code in blocks:
        try:
            ast.parse(code)
        except SyntaxError as e:
            return "code_syntax_error", f"line {e.lineno}: {e.msg}"
    return None


def make_judge(cfg: TextbookConfig):
    def judge(served: list[tuple[Request, dict[str, Any]]]) -> tuple[list[dict], list[dict]]:
        dedup = cfg.near_dup_filter()
        accepted, rejects = [], []
        for req, res in served:
            cut_off = cfg.keep_cut_off and res["status"] == "length"
            if res["status"] != "ok" and not cut_off:
                rejects.append(generator.reject(req, res, f"not_served_ok:{res['status']}", res.get("error", "")))
                continue
            text = res["text"]
            bad = validate(text, cfg)
            if bad:
                rejects.append(generator.reject(req, res, *bad))
                continue
            dup = dedup.add(req.key, text)
            if dup:
                rejects.append(generator.reject(req, res, "near_duplicate", f"of {dup[0]} (jaccard~{dup[1]:.2f})",
                                             duplicate_of=dup[0]))
                continue
            accepted.append({"text": text, "id": req.key, "sample_index": req.sample_index, **req.meta,
                             "model": req.model, "n_code_blocks": len(python_blocks(text)),
                             **({"cut_off": True} if cut_off else {})})
        return accepted, rejects
    return judge


def main(argv=None) -> int:
    return generator.main_flow(argv, "Generate synthetic Python textbook sections.", "textbook",
                            build_requests, make_judge, TextbookConfig)


if __name__ == "__main__":
    sys.exit(main())
