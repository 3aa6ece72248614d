"""The recipe's settings, as gin binds them (gin/recipes/*.gin): what the raw code is, who the
teacher is, and each stage's command settings.

A stage's settings are one `StageConfig` under the stage's gin scope::

    pretrain/phijax.recipe.StageConfig.gin_files = ['experiments/phi1_pretrain.gin']
    pretrain/phijax.recipe.StageConfig.gin_params = ['TRAIN_STEPS = 36000']
    textbooks/phijax.recipe.StageConfig.enabled = False

The recipe fills in what joins the stages (data paths, MODEL_DIRs, the tokenizer, the teacher's
endpoint); a stage's gin files and params say everything else. No jax, no tensorflow.
"""
from __future__ import annotations

import dataclasses
import re

import gin

STAGES = ("teacher", "quality_filter", "textbooks", "exercises", "mined_exercises", "decontaminate",
          "pretrain", "finetune", "evaluate", "pruned", "report")
# StageConfig scopes that are not stages: the pruned-data experiment's own models (unset: the main
# pretrain / finetune settings, and the main run is the unpruned baseline).
EXTRA_SCOPES = ("pruned_pretrain", "pruned_finetune")
TRAINING_STAGES = ("teacher", "pretrain", "finetune")
GENERATION_STAGES = ("textbooks", "exercises")  # the stages that pay a teacher
BENCHMARKS = ("humaneval", "mbpp")


class RecipeError(ValueError):
    """A bad recipe setting or input; the message names it."""


@gin.configurable(module="phijax.recipe")
@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage's command: gin files and bindings (training, data_gen and evaluation stages) or
    extra flags (mined_exercises), and whether it runs at all."""

    gin_files: tuple[str, ...] = ()
    gin_params: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    enabled: bool = True

    def __post_init__(self):
        for f in ("gin_files", "gin_params", "args"):
            v = getattr(self, f)
            if isinstance(v, str):
                raise RecipeError(f"StageConfig.{f} must be a list of strings, got the string {v!r}")
            object.__setattr__(self, f, tuple(str(x) for x in v))


def stage_config(name: str) -> StageConfig:
    """The StageConfig bound under gin scope `name`."""
    with gin.config_scope(name):
        return StageConfig()


@gin.configurable(module="phijax.recipe")
@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the recipe runs on, and what joins its stages.

    source: the raw code, as data_gen.quality_filter takes it (stdlib | dir:PATH | jsonl:GLOB |
      parquet:GLOB | stackoverflow:Posts.xml).
    tokenizer: the training tokenizer.json (e.g. phi-1's codegen-350M-mono one); None: the BPE of
      `vocab_size` trained on the stdlib (cached).
    teacher: who writes the textbooks and exercises: 'endpoint' (any OpenAI-compatible server:
      $OPENAI_BASE_URL or data_gen.EngineConfig in the stages' gins), 'train' (the teacher stage
      trains a model, which phijax.serve then serves on loopback) or 'serve:PATH' (phijax.serve
      serves the model at PATH: an export, MODEL_DIR or Hugging Face directory).
    serve_args: extra phijax.serve flags for a served teacher.
    benchmarks: what the evaluation stage scores (greedy pass@1; and pass@k when
      `pass_at_k_samples` > 1, at `pass_at_k_temperature`, for the `pass_at_k_ks`).
    evaluate_pretrained: also score the pretrained model (the "-base" row of the table).
    eval_params: per benchmark, phijax.evaluate bindings after the stage's own (e.g. an MBPP prompt format).
    eval_checkpoint: 'best' (the fine-tuning's best by periodic HumanEval, when it kept one) or 'final'.
    solution_loss: the held-out loss of the canonical solutions of these benchmarks, before and after
      fine-tuning.
    extra_bench: benchmark files (JSONL: task_id, code) decontamination also cleans every corpus of;
      None: phijax's library-usage probes and Unseen problems.
    prune_taus: the pruned-data experiment (paper §5): for each τ, retrain on the data less what
      decontamination flags at AST match >= τ against `prune_benchmarks`, and score those.
    """

    out_dir: str = gin.REQUIRED
    source: str = gin.REQUIRED
    tokenizer: str | None = None
    vocab_size: int = 8192
    teacher: str = "endpoint"
    serve_args: tuple[str, ...] = ()
    benchmarks: tuple[str, ...] = BENCHMARKS
    evaluate_pretrained: bool = True
    eval_checkpoint: str = "best"
    pass_at_k_samples: int = 0
    pass_at_k_temperature: float = 0.8
    pass_at_k_ks: tuple[int, ...] = (1, 10)
    solution_loss: tuple[str, ...] = ("humaneval",)
    eval_params: dict = dataclasses.field(default_factory=dict)  # benchmark -> phijax.evaluate bindings
    extra_bench: tuple[str, ...] | None = None  # None: the probes + Unseen sets (see extra_bench_files)
    prune_taus: tuple[float, ...] = ()
    prune_benchmarks: tuple[str, ...] = ("humaneval",)
    title: str = "phi-1 recipe"
    note: str = ""  # a paragraph the report prints first (e.g. "plumbing, not quality")

    def __post_init__(self):
        for f in ("serve_args", "benchmarks", "solution_loss", "pass_at_k_ks", "prune_taus", "prune_benchmarks",
                  "extra_bench"):
            v = getattr(self, f)
            if v is None:
                continue
            if isinstance(v, str):
                raise RecipeError(f"Recipe.{f} must be a list, got the string {v!r}")
            object.__setattr__(self, f, tuple(v))

    def validate(self) -> None:
        problems = []
        if not isinstance(self.out_dir, str) or not self.out_dir:
            problems.append("Recipe.out_dir (OUT_DIR or --out_dir) must be a directory path")
        if not isinstance(self.source, str) or not re.match(r"^(stdlib$|dir:|jsonl:|parquet:|stackoverflow:)",
                                                           self.source):
            problems.append(f"Recipe.source = {self.source!r}: expected stdlib, dir:PATH, jsonl:GLOB, "
                            f"parquet:GLOB or stackoverflow:Posts.xml")
        if not (self.teacher in ("endpoint", "train") or self.teacher.startswith("serve:")):
            problems.append(f"Recipe.teacher = {self.teacher!r}: expected 'endpoint', 'train' or 'serve:PATH'")
        if not all(isinstance(t, (int, float)) and 0.0 < t <= 1.0 for t in self.prune_taus):
            problems.append(f"Recipe.prune_taus {list(self.prune_taus)} must lie in (0, 1]")
        for b in (*self.benchmarks, *self.solution_loss, *self.prune_benchmarks):
            if b not in BENCHMARKS:
                problems.append(f"benchmark {b!r}: expected one of {', '.join(BENCHMARKS)}")
        for b, params in self.eval_params.items():
            if b not in BENCHMARKS or isinstance(params, str):
                problems.append(f"Recipe.eval_params: {b!r} -> {params!r}: expected a benchmark -> list of bindings")
        if self.eval_checkpoint not in ("best", "final"):
            problems.append(f"Recipe.eval_checkpoint = {self.eval_checkpoint!r}: expected 'best' or 'final'")
        if self.pass_at_k_samples < 0 or (self.pass_at_k_samples > 1 and
                                          any(k < 1 or k > self.pass_at_k_samples for k in self.pass_at_k_ks)):
            problems.append(f"Recipe.pass_at_k_ks {list(self.pass_at_k_ks)} must lie in [1, pass_at_k_samples = "
                            f"{self.pass_at_k_samples}]")
        if self.vocab_size < 256:
            problems.append(f"Recipe.vocab_size = {self.vocab_size} must be >= 256")
        if problems:
            raise RecipeError("; ".join(problems))

    def extra_bench_files(self) -> tuple[str, ...]:
        """What decontamination checks besides HumanEval and MBPP: by default phijax's own sets (the
        library-usage probes, the Unseen problems), so that no training corpus the recipe builds
        holds them."""
        if self.extra_bench is not None:
            return tuple(str(p) for p in self.extra_bench)
        from phijax.data import benchmarks

        return (str(benchmarks.LIBPROBE_BENCH_FILE), str(benchmarks.UNSEEN_BENCH_FILE))

    @property
    def served_teacher(self) -> bool:
        return self.teacher != "endpoint"
