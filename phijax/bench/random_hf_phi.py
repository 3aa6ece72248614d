"""A randomly initialised transformers PhiForCausalLM directory of a phijax preset's shape, with a tokenizer.

    python -m phijax.bench.random_hf_phi --out /tmp/phi1_random [--config phi1] [--dtype bfloat16] \\
        [--device cuda] [--bpe_vocab 8192]

For serving benchmarks where no trained checkpoint is at hand (phijax.bench.serve_load, device_perf.py's
`serve` stage): the speed of a server does not depend on the weights' values, only on their shapes and
on how many tokens each request generates (max_tokens here: random weights rarely pick end-of-text).
The config is `convert.config_to_hf(preset)` (phi1: vocab 51200, hidden 2048, 24 layers, 32 heads,
intermediate 8192, partial rotary factor 0.5, 2048 positions), the weights transformers' own init
(seeded), saved with save_pretrained in --dtype. The tokenizer is a byte-level BPE
(`vocab.train_bpe`: <|pad|> = 0, <|endoftext|> = 1) trained in seconds on a few Python standard
library sources, padded with unused added tokens up to the model's vocab size (so every id a
random model emits decodes, alike on both servers), saved as transformers reads it with the
eos/pad ids in config.json and generation_config.json (`serve_load.write_hf_tokenizer`).
"""
from __future__ import annotations

import os
import sysconfig
import time

from phijax.util import cli

# Small, stable stdlib modules: a few hundred KB of Python for the BPE.
STDLIB_FILES = ("argparse.py", "dataclasses.py", "functools.py", "inspect.py", "json/decoder.py", "pathlib.py",
                "textwrap.py", "typing.py", "collections/__init__.py", "subprocess.py")


def stdlib_texts(names=STDLIB_FILES) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for n in names:
        p = os.path.join(root, n)
        if os.path.isfile(p):
            with open(p, encoding="utf-8", errors="replace") as f:
                out.append(f.read())
    if not out:
        raise FileNotFoundError(f"none of {names} under {root}")
    return out


def build_tokenizer(path: str, vocab_size: int, bpe_vocab: int) -> int:
    """Trains the BPE (at most bpe_vocab entries) into `path`, padded to vocab_size ids; returns its size."""
    from tokenizers import AddedToken, Tokenizer

    from phijax.data import vocab

    vocab.train_bpe(stdlib_texts(), min(bpe_vocab, vocab_size), path)
    tok = Tokenizer.from_file(path)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n < vocab_size:  # ids a random model may emit: unused tokens, decoded as their text
        tok.add_tokens([AddedToken(f"<|unused_{i}|>", special=False, normalized=False) for i in range(vocab_size - n)])
        tok.save(path)
        n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} ids, more than the model's vocab_size={vocab_size}")
    return n


def build(out: str, config: str = "phi1", dtype: str = "bfloat16", device: str = "cpu", bpe_vocab: int = 8192,
          seed: int = 0) -> str:
    import torch
    import transformers

    from phijax import config as config_lib, convert
    from phijax.bench.serve_load import write_hf_tokenizer

    cfg = config_lib.preset(config)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    hf = transformers.PhiConfig(**convert.config_to_hf(cfg, dtype=dtype))
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # initialise in the saved dtype: half the host memory at bf16
    try:
        with torch.device(device):
            model = transformers.PhiForCausalLM(hf)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    del model
    tok_path = os.path.join(out, "tokenizer.json")
    n_tok = build_tokenizer(tok_path, cfg.vocab_size, bpe_vocab)
    write_hf_tokenizer(out, tok_path)
    print(f"{out}: random {config} PhiForCausalLM, {n_params / 1e6:,.1f}M parameters, {dtype}, tokenizer "
          f"{n_tok} ids (BPE <= {bpe_vocab} + unused), in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--config", default="phi1", help="a phijax preset: phi1, phi1_small, tiny (nano's 256-id "
                                                    "vocab is smaller than a byte-level BPE)")
    p.add_argument("--dtype", default="bfloat16", help="the saved weights' dtype")
    p.add_argument("--device", default="cpu", help="where torch initialises the weights (cuda: faster)")
    p.add_argument("--bpe_vocab", type=int, default=8192, help="the trained BPE's size (the rest is padding)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cli.setup_logging()
    build(args.out, args.config, args.dtype, args.device, args.bpe_vocab, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
