"""phijax.evaluate.solution_loss: the held-out loss of canonical solutions given their prompts."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from phijax import decode
from phijax import loss as loss_lib
from phijax import model as model_lib
from phijax.data import packing
from phijax.evaluate import problems as problems_lib
from phijax.evaluate import solution_loss as sl

import test_decode

# Three that fit the fixture's 256 positions (99, 124, 180 tokens with its 300-id tokenizer: buckets
# 128, 128, 256) and HumanEval/0, which does not (~430).
IDS = ("HumanEval/53", "HumanEval/45", "HumanEval/28")

hf_dir = test_decode.hf_dir  # the module-scoped fixture: a tiny PhiForCausalLM directory, 256 positions


@pytest.fixture(scope="module")
def probs():
    by_id = {p.task_id: p for p in problems_lib.load_problems("humaneval")}
    return [by_id[i] for i in IDS] + [by_id["HumanEval/0"]]


@pytest.fixture(scope="module")
def model(hf_dir):
    return decode.load_for_inference(hf_dir)


@pytest.fixture(scope="module")
def result(model, probs):
    return sl.solution_loss(model, probs, batch_size=2)


def test_matches_transformers_on_the_solution_tokens(hf_dir, model, probs, result):
    hf = transformers.PhiForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    tok = model.tokenizer
    total, n, per = 0.0, 0, {}
    for p in probs[:3]:
        prompt, sol = tok.encode(p.prompt), tok.encode(p.canonical_solution)
        ids = torch.tensor([prompt + sol])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
        nll = -sum(float(logp[j - 1, ids[0, j]]) for j in range(len(prompt), len(prompt) + len(sol)))
        per[p.task_id] = nll / len(sol)
        total, n = total + nll, n + len(sol)
    assert result["tokens"] == n and result["problems"] == 3
    assert result["loss"] == pytest.approx(total / n, rel=1e-4)
    for row in result["per_problem"]:
        assert row["loss"] == pytest.approx(per[row["task_id"]], rel=1e-4)
    assert result["skipped"] == {"count": 1, "ids": ["HumanEval/0"]}
    assert result["buckets"] == [128, 256] and result["benchmark"] == "humaneval"
    assert result["per_problem_loss_mean"] == pytest.approx(np.mean(list(per.values())), rel=1e-4)


@pytest.mark.parametrize("kw", [dict(batch_size=1), dict(batch_size=8, min_bucket=256), dict(max_len=160)])
def test_batch_size_and_bucket_do_not_change_the_result(model, probs, result, kw):
    other = sl.solution_loss(model, probs, **kw)
    if "max_len" in kw:  # the 180-token problem (179 input positions) no longer fits
        assert other["skipped"]["ids"] == ["HumanEval/28", "HumanEval/0"]
        assert [r["task_id"] for r in other["per_problem"]] == list(IDS[:2])
        assert [r["loss"] for r in other["per_problem"]] == pytest.approx(
            [r["loss"] for r in result["per_problem"][:2]], rel=1e-6)
        return
    assert other["loss"] == pytest.approx(result["loss"], rel=1e-6)
    assert other["tokens"] == result["tokens"] and other["skipped"] == result["skipped"]
    assert [r["task_id"] for r in other["per_problem"]] == [r["task_id"] for r in result["per_problem"]]


def test_is_the_fine_tuning_objective_and_falls_with_fine_tuning(model, probs):
    """With score_eos, a problem's solution loss is exactly the loss fine-tuning minimises on its
    packed (prompt, solution) example (phijax.data.packing, loss on the solution); a few steps of
    fine-tuning on the solutions lower it well below the untrained figure."""
    tok, train = model.tokenizer, probs[:2]
    arrays = [packing.example_arrays(tok.encode(p.prompt), tok.encode(p.canonical_solution), tok.eos_id)
              for p in train]
    length = max(len(a[0]) for a in arrays)
    batch = {k: np.zeros((len(arrays), length), dt) for k, dt in
             (("inputs", np.int32), ("targets", np.int32), ("loss_weights", np.float32))}
    for r, (x, y, w) in enumerate(arrays):
        batch["inputs"][r, :len(x)], batch["targets"][r, :len(y)], batch["loss_weights"][r, :len(w)] = x, y, w

    def objective(params):
        s, n = loss_lib.token_loss_sums(model_lib.apply(model.graphdef, params, batch["inputs"]), batch["targets"],
                                        batch["loss_weights"])
        return s / n

    params = jax.tree.map(jnp.asarray, model.params)
    before = sl.solution_loss(model, train, score_eos=True)
    assert before["loss"] == pytest.approx(float(objective(params)), rel=1e-5)
    opt = optax.adam(1e-2)
    state = opt.init(params)
    step = jax.jit(lambda p, s: (lambda l, g: (l, *opt.update(g, s, p)))(*jax.value_and_grad(objective)(p)))
    for _ in range(15):
        _, updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    tuned = decode.InferenceModel(model.graphdef, jax.tree.map(np.asarray, params), model.cfg, tok)
    after = sl.solution_loss(tuned, train, score_eos=True)
    assert after["loss"] == pytest.approx(float(objective(params)), rel=1e-5)
    assert after["loss"] < 0.5 * before["loss"], (before["loss"], after["loss"])
    assert after["tokens"] == before["tokens"] == sum(int(a[2].sum()) for a in arrays)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "phijax.evaluate.solution_loss", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_the_json_and_rejects_bad_input(hf_dir, model, tmp_path):
    out = tmp_path / "loss.json"
    r = _cli("--model", hf_dir, "--limit", "30", "--batch_size", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    expected = sl.solution_loss(model, problems_lib.load_problems("humaneval", limit=30))
    assert data["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert data["skipped"] == expected["skipped"] and data["problems"] + data["skipped"]["count"] == 30
    assert r.stdout.strip() == (f"humaneval solution loss: {data['loss']:.4f} nats/token over {data['tokens']} "
                                f"tokens ({data['problems']} problems, {data['skipped']['count']} skipped)")

    r = _cli("--model", hf_dir, "--limit", "1", "--out", str(tmp_path / "none.json"))  # HumanEval/0 does not fit
    assert r.returncode == 2 and "error:" in r.stderr and not (tmp_path / "none.json").exists()

    missing = tmp_path / "no_such_model"
    r = _cli("--model", str(missing))
    assert r.returncode == 2 and "error:" in r.stderr and str(missing) in r.stderr
    r = _cli("--model", hf_dir, "--benchmark", "apps")
    assert r.returncode == 2 and "error:" in r.stderr and "apps" in r.stderr
