"""Named rematerialisation (activation checkpointing) policies for the scanned layer.

The layer tags the attention context (the output projection's input) and the MLP hidden
activation (fc2's input) with `checkpoint_name`, so `save_attn_mlp` keeps exactly those and
recomputes the rest (the branch outputs themselves are never needed by the backward pass).
`save_dots_attn` is `save_dots_no_batch` plus the outputs of a fused attention kernel (cuDNN,
splash), which the dot policies recompute since they are not dots (with the XLA attention
backend it is `save_dots_no_batch`). `offload_dots` keeps
what `save_dots_no_batch` keeps (the weight matmul outputs) in host memory instead of HBM:
copied to the host in the forward pass, fetched back for the backward pass (JAX memory kind
'pinned_host'; TPU and GPU, and XLA:CPU where it is a copy within the same RAM).
"""
from __future__ import annotations

import jax

from phijax.kernels import target_devices

cp = jax.checkpoint_policies

HOST = "pinned_host"

# Forward primitives of the fused attention kernels (cuDNN through jax.nn.dot_product_attention;
# Pallas splash). Their outputs include the softmax statistics the backward kernel needs, so
# saving them means the backward pass never reruns the attention forward.
FUSED_ATTENTION_PRIMITIVES = ("dot_product_attention_fwd", "pallas_call")


def _dots_and_fused_attention(prim, *avals, **params) -> bool:
    return (cp.dots_with_no_batch_dims_saveable(prim, *avals, **params)
            or prim.name.startswith(FUSED_ATTENTION_PRIMITIVES))


POLICIES = {
    "none": None,  # no remat: keep every activation (fastest, most memory)
    "full": cp.nothing_saveable,  # recompute the whole layer in the backward pass
    "save_dots": cp.dots_saveable,  # keep matmul outputs, recompute elementwise ops
    "save_dots_no_batch": cp.dots_with_no_batch_dims_saveable,  # keep weight matmuls, not attention scores
    "save_dots_attn": _dots_and_fused_attention,  # save_dots_no_batch + the fused attention kernel's outputs
    "save_attn_mlp": cp.save_only_these_names("attn_context", "mlp_hidden"),
    "offload_dots": cp.offload_dot_with_no_batch_dims("device", HOST),  # save_dots_no_batch, in host memory
}
OFFLOAD = frozenset(p for p in POLICIES if p.startswith("offload_"))


def check_offload_supported(policy: str, devices=None) -> None:
    """Raise if the devices have no host memory space to offload to."""
    device = (devices or target_devices())[0]
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # noqa: BLE001 - backends without memory kinds
        kinds = set()
    if HOST not in kinds:
        raise ValueError(f"remat policy {policy!r} offloads activations to {HOST!r} memory, which "
                         f"{device.platform} device {device.device_kind!r} does not have (its memories: "
                         f"{sorted(kinds) or 'none reported'}); use 'save_dots_no_batch' or 'full'")


def apply(fn, policy: str):
    if policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; known: {sorted(POLICIES)}")
    if policy == "none":
        return fn
    if policy in OFFLOAD:
        check_offload_supported(policy)
    return jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=False)
