"""Named rematerialisation (activation checkpointing) policies for the scanned layer.

The layer tags its attention and MLP outputs with `checkpoint_name`, so the
`save_attn_mlp` policy can keep exactly those and recompute the rest.
"""
from __future__ import annotations

import jax

cp = jax.checkpoint_policies

POLICIES = {
    "none": None,  # no remat: keep every activation (fastest, most memory)
    "full": cp.nothing_saveable,  # recompute the whole layer in the backward pass
    "save_dots": cp.dots_saveable,  # keep matmul outputs, recompute elementwise ops
    "save_dots_no_batch": cp.dots_with_no_batch_dims_saveable,  # keep weight matmuls, not attention scores
    "save_attn_mlp": cp.save_only_these_names("attn_out", "mlp_out"),
}


def apply(fn, policy: str):
    if policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; known: {sorted(POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=False)
