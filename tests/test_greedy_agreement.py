"""phijax.bench.greedy_agreement on the tiny config (CPU, ~15 s): greedy decoding equals transformers'
token for token in fp32, and in bf16 the two sides part only at near-ties that rounding decided."""
from __future__ import annotations

from phijax.bench import greedy_agreement

FIELDS = ("rows_identical", "prefix_token_share", "position_token_share", "forward_matches_decode",
          "margin_at_divergence", "margin_elsewhere", "logit_diff_elsewhere", "top_logit_elsewhere", "divergences",
          "per_row")
DIVERGENCE_FIELDS = ("row", "position", "margin_phijax", "margin_torch", "logit_diff", "top_logit", "bf16_step")


def test_fp32_identical_and_bf16_divergences_are_near_ties():
    rows, new = 8, 48
    res = greedy_agreement.main(["--config", "tiny", "--rows", str(rows), "--new_tokens", str(new),
                                 "--prompt_lengths", "8,64", "--dtypes", "float32,bfloat16"])
    fp32, bf16 = res["by_dtype"]["float32"], res["by_dtype"]["bfloat16"]
    for r in (fp32, bf16):
        assert all(k in r for k in FIELDS)
        assert all(k in d for d in r["divergences"] for k in DIVERGENCE_FIELDS)
        assert r["prefix_token_share"] == sum(row["first_divergence"] for row in r["per_row"]) / (rows * new)

    assert fp32["rows_identical"] == rows and fp32["prefix_token_share"] == 1.0 and fp32["divergences"] == []
    assert fp32["logit_diff_elsewhere"]["max"] < 1e-4  # fp32: both sides compute the same logits

    # bf16, in units of one bf16 step at the largest logit. Ordinary margins are many steps wide
    # (so the bounds below are not vacuous on near-flat random logits); the two sides' logits differ
    # by a few steps of rounding; and a row parts only where the two best logits are within two
    # steps on BOTH sides. A 2% error in every bf16 linear layer of phijax fails both bounds.
    step = greedy_agreement.bf16_step(bf16["top_logit_elsewhere"]["max"])
    assert bf16["margin_elsewhere"]["phijax"]["median"] > 4 * step
    assert bf16["logit_diff_elsewhere"]["max"] <= 4 * step
    for d in bf16["divergences"]:
        assert max(d["margin_phijax"], d["margin_torch"]) <= 2 * d["bf16_step"], d
