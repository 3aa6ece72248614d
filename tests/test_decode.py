"""phijax.decode: KV-cache decoding against the real transformers `generate`, on a small random
PhiForCausalLM (GQA + qk LayerNorm, fp32) with a BPE tokenizer trained here.

Compiled programs are shared through module-scoped samplers (one per mesh) and a few prompt
buckets, so the whole file compiles about ten small programs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import jax
import numpy as np
import pytest

import torch
import transformers

from phijax import checkpoint as ckpt_lib
from phijax import config, decode, sharding
from phijax import model as model_lib
from phijax.data import vocab
from phijax.evaluate.problems import HUMANEVAL_STOP

N_NEW = 24  # new-token bucket 32
EOS = 1  # <|endoftext|> in tokenizers trained by phijax.data.vocab


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_phi")
    texts = [pathlib.Path(m.__file__).read_text() for m in (os, json, dataclasses)]
    vocab.train_bpe(texts, 300, d / "tokenizer.json")
    torch.manual_seed(0)
    cfg = transformers.PhiConfig(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True,
                                 initializer_range=0.1, max_position_embeddings=256, bos_token_id=None,
                                 eos_token_id=EOS, pad_token_id=0)
    cfg._attn_implementation = "eager"
    m = transformers.PhiForCausalLM(cfg).eval()
    tok = vocab.BPETokenizer(d / "tokenizer.json")
    partial_utf8 = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    with torch.no_grad():  # LayerNorms start at (1, 0): move them so their use is tested
        for name, p in m.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
        m.lm_head.bias[partial_utf8] -= 10.0  # lone non-ASCII bytes: keep completions readable text
    m.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    m = transformers.PhiForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    return m


@pytest.fixture(scope="module")
def model(hf_dir):
    return decode.load_for_inference(hf_dir)


@pytest.fixture(scope="module")
def sampler(model):
    # min_prompt_bucket 32: every short prompt here shares one compiled prefill per mode
    return decode.Sampler(model, batch_size=4, chunk_size=8, min_prompt_bucket=32)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 300, n).tolist() for n in lengths]


def _hf_greedy(m, prompts, n_new):
    """transformers' batched greedy generate on a left-padded batch (end-of-text disabled)."""
    p = max(map(len, prompts))
    ids = torch.zeros((len(prompts), p), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x)
        mask[i, p - len(x):] = 1
    with torch.no_grad():
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, p:].tolist()


def _ascii_pair(text: str) -> str:
    """The first two-character window of printable ASCII in text (a stop sequence that can occur)."""
    for i in range(len(text) - 1):
        if all(32 <= ord(c) < 127 or c == "\n" for c in text[i:i + 2]):
            return text[i:i + 2]
    raise AssertionError(f"no ASCII pair in {text!r}")


PARITY_PROMPTS = _prompts([3, 11, 17, 30, 6, 25])  # two batches of 4, bucket 32


def test_greedy_matches_transformers_generate(sampler, hf_model):
    ours = [o[0] for o in sampler.generate_tokens(PARITY_PROMPTS, N_NEW, stop_at_eos=False)]
    theirs = _hf_greedy(hf_model, PARITY_PROMPTS, N_NEW)
    assert ours == theirs
    assert len({tuple(o) for o in ours}) == len(ours)  # the prompts really lead to different tokens


def test_end_of_text_stops_each_row(sampler):
    full = [o[0] for o in sampler.generate_tokens(PARITY_PROMPTS[:4], N_NEW, stop_at_eos=False)]
    eos = full[0][5]  # a token row 0 produces at step 5: pretend it is end-of-text
    got = [o[0] for o in sampler.generate_tokens(PARITY_PROMPTS[:4], N_NEW, eos_id=eos)]
    for f, g in zip(full, got):
        want = f[:f.index(eos) + 1] if eos in f else f
        assert g == want
    assert len(got[0]) == 6


def test_same_bucket_does_not_recompile(sampler):
    sampler.generate_tokens(_prompts([20]), N_NEW)
    before = dict(sampler.traces)
    sampler.generate_tokens(_prompts([27, 19], seed=1), N_NEW - 3)  # prompt bucket 32, new bucket 32
    assert dict(sampler.traces) == before
    sampler.generate_tokens(_prompts([40]), N_NEW)  # prompt bucket 64: one new prefill, one new loop
    assert sampler.traces["prefill"] == before["prefill"] + 1
    assert sampler.traces["decode"] == before["decode"] + 1


def test_decode_loop_writes_the_stacked_cache_in_place():
    """The layer scan carries the stacked k/v buffers and writes each token into them: the compiled
    loop holds no second cache (scanning the cache as per-layer input/output would rebuild it every
    token). Compiled on abstract weights (`Sampler.lower`): nothing is allocated."""
    cfg = config.preset("nano", n_layers=4, dtype="float32", param_dtype="float32")
    graphdef, params, _ = model_lib.abstract(cfg)
    sampler = decode.Sampler(decode.InferenceModel(graphdef, params, cfg), batch_size=64)
    _, loop = sampler.lower(64, 64)
    cache_bytes = 2 * cfg.n_layers * 64 * cfg.kv_heads * (64 + 64) * cfg.head_dim * 4
    mem = loop.compile().memory_analysis()
    assert mem.alias_size_in_bytes >= cache_bytes  # the donated state, cache included, is the output
    assert mem.temp_size_in_bytes < cache_bytes / 2  # at most a layer's block is copied for attention


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_p=0.9, seed=3)], ids=["greedy", "top_p"])
def test_result_does_not_depend_on_the_batch(sampler, kw):
    a = _prompts([20], seed=7)[0]
    alone = sampler.generate_tokens([a], N_NEW, **kw)[0]
    # Greedy: a longer bucket (64: other padding); sampled: the same bucket (fewer compilations).
    others = _prompts([40 if not kw else 30, 5, 31], seed=8)
    mixed = sampler.generate_tokens([a] + others, N_NEW, **kw)[0]  # sampling keys: (seed, prompt index)
    assert alone == mixed


def test_sampling_is_seeded_and_top_p_narrows(sampler):
    prompts = _prompts([12, 20], seed=4)
    kw = dict(temperature=1.0, top_p=0.95, num_samples=3)
    a = sampler.generate_tokens(prompts, N_NEW, seed=11, **kw)
    assert sampler.generate_tokens(prompts, N_NEW, seed=11, **kw) == a
    b = sampler.generate_tokens(prompts, N_NEW, seed=12, **kw)
    assert a != b
    assert len({tuple(s) for s in a[0]}) > 1  # the samples of one prompt differ
    greedy = sampler.generate_tokens(prompts, N_NEW)
    nucleus_of_one = sampler.generate_tokens(prompts, N_NEW, temperature=1.0, top_p=1e-6, num_samples=2, seed=5)
    assert [o * 2 for o in greedy] == nucleus_of_one  # only the most likely token survives


def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]], np.float32))

    def kept(p):
        return np.isfinite(np.asarray(decode.top_p_filter(logits, p)))[0].tolist()

    assert kept(0.5) == [False, True, False, False]
    assert kept(0.79) == [False, True, False, True]
    assert kept(0.81) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]


def test_complete_cuts_before_the_first_stop_sequence(sampler, model):
    tok = model.tokenizer
    prompts = ["def add(a, b):\n    ", "import os\n", "class A:\n    x = 1\n", "# sum a list\n"]
    ids = [o[0] for o in sampler.generate_tokens(tok.encode_batch(prompts), N_NEW)]
    texts = [tok.decode([t for t in r if t != EOS]) for r in ids]
    stop = _ascii_pair(texts[1][len(texts[1]) // 3:])  # occurs in prompt 1's completion
    got = sampler.complete(prompts, N_NEW, stop=(stop, "\x00never"))
    for text, g in zip(texts, got):
        assert g == [text[:text.find(stop)] if stop in text else text]
    assert got[1][0] != texts[1]
    plain = sampler.complete(prompts, N_NEW, stop=())
    assert [p[0] for p in plain] == texts
    # HumanEval's stops, several samples per prompt: each sample is cut at its own first stop
    samples = sampler.complete(prompts[:2], N_NEW, temperature=1.0, num_samples=2, seed=1, stop=HUMANEVAL_STOP)
    full = sampler.complete(prompts[:2], N_NEW, temperature=1.0, num_samples=2, seed=1)
    for s_row, f_row in zip(samples, full):
        assert s_row == [decode.cut_at_stop(f, HUMANEVAL_STOP)[0] for f in f_row]


def test_host_stops_end_the_loop_early(sampler, model):
    prompt = ["def add(a, b):\n    "]
    full = sampler.generate_tokens(model.tokenizer.encode_batch(prompt), N_NEW)[0][0]
    assert sampler.last_steps == [len(full)] and len(full) > 12  # ran to end-of-text or the limit
    text = sampler.complete(prompt, N_NEW, stop=())[0][0]
    stop = _ascii_pair(text)
    assert sampler.complete(prompt, N_NEW, stop=(stop,))[0][0] == text[:text.find(stop)]
    assert sampler.last_steps[0] <= 9  # prefill + one chunk of 8 steps, then the host saw the stop


def test_sharded_mesh_matches_single_device(model, sampler):
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = decode.Sampler(model, batch_size=8, mesh=mesh)
    spec = sharded.params["layers"]["mlp"]["fc1"]["kernel"].sharding.spec
    assert "tensor" in jax.tree.leaves(tuple(spec))  # the weights really are split
    prompts = PARITY_PROMPTS + _prompts([9, 14], seed=2)
    assert (sharded.generate_tokens(prompts, N_NEW, stop_at_eos=False)
            == sampler.generate_tokens(prompts, N_NEW, stop_at_eos=False))


def test_load_export_matches_hf_dir(model, hf_dir, tmp_path):
    export = str(tmp_path / "export")
    ckpt_lib.export_params(model.params, export, config=model.cfg.to_dict(),
                           tokenizer_path=os.path.join(hf_dir, "tokenizer.json"))
    assert ckpt_lib.read_export_info(export)["tokenizer"] == "tokenizer.json"
    loaded = decode.load_for_inference(export)
    assert loaded.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)
    assert loaded.tokenizer.encode("def f():") == model.tokenizer.encode("def f():")
    assert loaded.tokenizer.eos_id == EOS


def test_fit_context_generates_what_fits_beside_each_prompt(sampler, caplog):
    """fit_context=True: a prompt + max_new_tokens past max_len (256) generates only what fits beside
    it, the same tokens as asking for exactly that many; one log line says so. A prompt that fills
    the context alone is still an error."""
    prompts = _prompts([250, 240, 20], seed=3)  # room beside them: 6, 16, 236
    caplog.set_level(logging.INFO, logger="phijax.decode")
    got = sampler.generate_tokens(prompts, N_NEW, stop_at_eos=False, fit_context=True)
    assert [len(g[0]) for g in got] == [6, 16, N_NEW]
    said = [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()]
    assert len(said) == 1 and "beside 2 of 3 prompts" in said[0] and "(6 to 16 new tokens)" in said[0], said
    for p, g in zip(prompts, got):
        assert sampler.generate_tokens([p], len(g[0]), stop_at_eos=False)[0] == g
    with pytest.raises(ValueError, match="max_len=256"):
        sampler.generate_tokens(_prompts([256]), N_NEW, fit_context=True)


def test_bad_input_is_reported_before_decoding(model, sampler, hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        decode.load_for_inference(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="parameter shapes"):
        decode.load_for_inference(hf_dir, d_model=128)
    with pytest.raises(ValueError, match="max_len=256"):
        sampler.generate_tokens(_prompts([250]), 10)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate_tokens([[5], []], 10)
    with pytest.raises(ValueError, match="outside"):
        sampler.generate_tokens([[5, 300]], 10)
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate_tokens([[5]], 10, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampler.generate_tokens([[5]], 10, temperature=-1.0)
    with pytest.raises(ValueError, match="no tokenizer"):
        decode.Sampler(dataclasses.replace(model, tokenizer=None)).complete(["x"], 4)
    with pytest.raises(ValueError, match="data-parallel size 4"):
        decode.Sampler(model, batch_size=6, mesh=sharding.make_mesh((2, 2, 2)))
