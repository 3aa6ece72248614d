"""Evaluation during training: greedy pass@1 on HumanEval/MBPP every N steps, best export kept.

phi-1 picked its fine-tuned model as the best of checkpoints saved every 1,000 steps by
HumanEval score; `PeriodicEval` does that inside the run. Each evaluation decodes with the
live (sharded) training parameters through one `decode.Sampler` (compiled once, reused),
scores in the sandbox, logs `eval/<benchmark>/pass@1` to metrics.jsonl/TensorBoard and writes
MODEL_DIR/eval/ (samples, per-problem results, report.md, pass_at_1.png). A new best score
exports the parameters to MODEL_DIR/best/ (with the tokenizer, so `phijax.evaluate` and
`decode.load_for_inference` read it directly) and then records it in MODEL_DIR/best.json.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import gin
import jax

from phijax import checkpoint as ckpt_lib
from phijax.util.files import atomic_write_bytes
# Imported before gin parses the config: phijax.evaluate.run registers gin configurables on import.
from phijax.evaluate import problems, report
from phijax.evaluate import run as eval_run

log = logging.getLogger("phijax.train")

BEST_JSON = "best.json"


@gin.configurable
class PeriodicEval:
    """`every_steps=0` turns evaluation off. `limit`: the first N problems (None: all)."""

    def __init__(self, every_steps: int = 0, benchmark: str = "humaneval", prompt_format: str | None = None,
                 limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 8,
                 tokenizer_path: str | None = None, workers: int | None = None, timeout_s: float = 10.0,
                 keep_best: bool = True):
        if every_steps < 0:
            raise ValueError(f"PeriodicEval.every_steps={every_steps} must be >= 0 (0: off)")
        self.every_steps, self.benchmark, self.limit = every_steps, benchmark, limit
        self.max_new_tokens, self.batch_size, self.tokenizer_path = max_new_tokens, batch_size, tokenizer_path
        self.workers, self.timeout_s, self.keep_best = workers, timeout_s, keep_best
        self.prompt_format = prompt_format
        self._sampler = None

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0

    def due(self, step: int, final_step: int) -> bool:
        return self.enabled and (step % self.every_steps == 0 or step == final_step)

    def check(self, *, model_dir: str, mesh) -> None:
        """Validate the settings before any data or model work (not at step N)."""
        if not self.enabled:
            return
        self.prompt_format = problems.check_format(self.benchmark, self.prompt_format)
        if self.tokenizer_path is not None and not os.path.isfile(self.tokenizer_path):
            raise ValueError(f"PeriodicEval.tokenizer_path={str(self.tokenizer_path)!r} is not a file")
        if "://" in model_dir:
            raise ValueError("PeriodicEval writes its reports with local file APIs; MODEL_DIR must be a local "
                             f"path when evaluation is on (got {model_dir!r})")
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.batch_size % dp:
            raise ValueError(f"PeriodicEval.batch_size={self.batch_size} is not divisible by the mesh's "
                             f"data-parallel size {dp}")

    def setup(self, *, model_dir: str, graphdef, cfg, mesh, rules, data) -> None:
        """Bind the run (after `check`): the tokenizer defaults to the one the data came from."""
        if not self.enabled:
            return
        path = self.tokenizer_path or getattr(data, "tokenizer_path", None)
        if path is None:
            raise ValueError("PeriodicEval needs a tokenizer to decode: set PeriodicEval.tokenizer_path "
                             "(this data source does not name one)")
        self.tokenizer_path = str(path)
        self.model_dir = model_dir
        self.output_dir = os.path.join(model_dir, "eval")
        self._graphdef, self._cfg, self._mesh, self._rules = graphdef, cfg, mesh, rules
        self.best = self.read_best(model_dir)

    @staticmethod
    def read_best(model_dir: str) -> dict | None:
        path = os.path.join(model_dir, BEST_JSON)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def evaluated_steps(self) -> set[int]:
        return {h["step"] for h in report.read_history(self.output_dir) if h.get("benchmark") == self.benchmark}

    def _get_sampler(self, params):
        from phijax import decode
        from phijax.data import vocab

        if self._sampler is None:
            model = decode.InferenceModel(self._graphdef, params, self._cfg, vocab.BPETokenizer(self.tokenizer_path))
            self._sampler = decode.Sampler(model, batch_size=self.batch_size, mesh=self._mesh, rules=self._rules)
        self._sampler.params = params  # same shardings every time: the compiled programs are reused
        return self._sampler

    def run(self, step: int, params) -> dict:
        """Evaluate `params` (the training state's, sharded) at `step`; returns metrics to log."""
        out_dir = self.output_dir if jax.process_index() == 0 else None
        summary = eval_run.evaluate_model(
            self._get_sampler(params), benchmark=self.benchmark, prompt_format=self.prompt_format, limit=self.limit,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, workers=self.workers,
            timeout_s=self.timeout_s, output_dir=out_dir, step=step, source=self.model_dir)
        score = float(summary["pass@1"])
        key = f"eval/{self.benchmark}/pass@1"
        is_best = self.best is None or score > self.best["pass@1"]
        log.info("step %d | %s %.2f%% (%d problems, %s prompts)%s", step, key, 100 * score, summary["problems"],
                 self.prompt_format, " | new best" if is_best else f" | best {100 * self.best['pass@1']:.2f}% "
                 f"at step {self.best['step']}")
        if is_best and self.keep_best:
            best_dir = os.path.join(self.model_dir, "best")
            ckpt_lib.export_params(params, best_dir, config=self._cfg.to_dict(), tokenizer_path=self.tokenizer_path)
            self.best = {"step": step, "pass@1": score, "benchmark": self.benchmark,
                         "prompt_format": self.prompt_format, "problems": summary["problems"], "export": best_dir}
            if jax.process_index() == 0:  # written after the export: best.json never names a partial export
                atomic_write_bytes(Path(self.model_dir, BEST_JSON), json.dumps(self.best, indent=2).encode())
        return {key: score}
