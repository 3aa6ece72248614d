"""Byte-level BPE (Hugging Face `tokenizers`) stored as a single tokenizer.json.

Conventions (shared by the seqio vocabulary and the window cache):
  * ``pad_id`` is always 0 (seqio's PAD_ID). Our own tokenizers put
    ``<|pad|>`` there, so id 0 never is real text.
  * Foreign files without a pad token -- phi-1's codegen-350M-mono
    tokenizer.json (GPT-2 byte-level BPE + whitespace runs, 50295 entries) --
    are loaded as they are, with no id offset: id 0 stays GPT-2's "!", and
    ``has_pad_token`` is False. Padding is then never recognised by its id:
    pretraining windows have no padding at all, packed rows mark it with
    segment_ids == 0 and loss_weights == 0, and the model masks by segment id.
    So ids match the ``tokenizers`` library (and a Hugging Face checkpoint's
    embedding rows) exactly.
  * The EOS id comes from the file: ``<|endoftext|>`` is 1 in our tokenizers,
    50256 in GPT-2/codegen's; it is appended after every document.
  * Special tokens are NOT recognised inside text: ``encode`` treats a literal
    "<|endoftext|>" in a source file as ordinary bytes. So encode->decode is
    exact for every string, and data can never forge a document boundary; EOS
    ids only come from the pipeline appending them.

No tensorflow here (the trainer imports this on accelerator hosts).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from phijax.data import corpus as corpus_lib
from phijax.util import cli
from phijax.util.files import atomic_write_bytes, default_cache_dir, file_fingerprint  # noqa: F401

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = (EOS_TOKEN,)
DEFAULT_VOCAB_SIZE = 8192

log = logging.getLogger(__name__)


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """Rounds the embedding-table size up so it shards/tiles evenly on TPU/GPU."""
    if n < 1 or multiple < 1:
        raise ValueError(f"need n >= 1 and multiple >= 1, got n={n}, multiple={multiple}")
    return -(-n // multiple) * multiple


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    pad_token: str = PAD_TOKEN,
) -> Path:
    """Trains a byte-level BPE and writes ``out_path`` (tokenizer.json) atomically.

    Ids: 0 = ``pad_token``, then ``special_tokens`` in order, then the 256 byte
    symbols, then merges. Byte-level pre-tokenizer + decoder make every string
    round-trip; indentation runs are learned as merges (the GPT-2 regex splits
    whitespace runs into their own pre-tokens), so no hand-added space tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [pad_token] + [t for t in special_tokens if t != pad_token]
    min_size = len(specials) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} < {min_size} (specials + 256 byte symbols)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # All 256 bytes up front: unseen bytes at encode time still map to ids.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out_path)
    atomic_write_bytes(out, tok.to_str(pretty=False).encode("utf-8"))
    return out


def corpus_tokenizer_path(
    corpus_root: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | os.PathLike | None = None,
    name: str = "corpus",
) -> Path:
    """Trains (once) a BPE on every document under ``corpus_root``; cached by
    corpus fingerprint + vocab size, so a changed corpus gets a new file."""
    root = Path(corpus_root)
    fp = corpus_lib.corpus_fingerprint(root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "tokenizers" / f"bpe-{name}-{fp}-v{vocab_size}.json"
    if path.exists():
        return path
    t0 = time.time()
    skips = corpus_lib.SkipReport()
    texts = (text for _, text in corpus_lib.iter_documents(root, skips))
    train_bpe(texts, vocab_size, path)
    log.info("trained BPE vocab=%d on %s in %.1fs (%d files skipped) -> %s",
             vocab_size, root, time.time() - t0, skips.count, path)
    return path


def stdlib_tokenizer_path(
    vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | os.PathLike | None = None
) -> Path:
    # Full-corpus training measured at ~15 s on 2 cores, so no subsetting.
    return corpus_tokenizer_path(corpus_lib.stdlib_root(), vocab_size, cache_dir, name="stdlib")


class BPETokenizer:
    """Thin wrapper over a tokenizer.json (numpy/tf free)."""

    def __init__(self, path: str | os.PathLike, eos_token: str = EOS_TOKEN,
                 pad_token: str | None = PAD_TOKEN):
        """``pad_token``: if the file has it, it must sit at id 0; if the file
        lacks it (or ``pad_token`` is None) the tokenizer has no pad token and
        ``pad_id`` is still 0 (see module docstring)."""
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist "
                                    f"(pass the path of a Hugging Face tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{self.path} is not a valid tokenizer.json: {e}") from e
        # Not stored in tokenizer.json, so set on every load: treat special-token
        # strings inside text as plain text (see module docstring).
        self._tok.encode_special_tokens = True
        self.eos_id = self._required_id(eos_token)
        pad = self._tok.token_to_id(pad_token) if pad_token is not None else None
        if pad is not None and pad != 0:
            raise ValueError(f"{self.path}: pad token {pad_token!r} has id {pad}; seqio needs "
                             f"padding at id 0")
        self.has_pad_token = pad is not None
        self.pad_id = 0
        self.fingerprint = file_fingerprint(self.path)

    def _required_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path}: token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        """Real number of ids (max id + 1)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking (tokenizers >= 0.20.2).
        fn = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Exact inverse of ``encode``; EOS/PAD ids render as their token text
        unless ``skip_special_tokens``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(description="Byte-level BPE tokenizers (Hugging Face tokenizers) for phijax.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer.json")
    t.add_argument("--corpus", default="stdlib", help="'stdlib' or a directory of *.py files")
    t.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    t.add_argument("--out", required=True, help="output tokenizer.json path")
    args = p.parse_args(argv)
    cli.setup_logging()
    try:
        root = corpus_lib.resolve_corpus(args.corpus)
    except ValueError as e:
        return cli.fail(e)
    skips = corpus_lib.SkipReport()
    t0 = time.time()
    out = train_bpe((text for _, text in corpus_lib.iter_documents(root, skips)), args.vocab_size, args.out)
    tok = BPETokenizer(out)
    print(f"wrote {out}: vocab_size={tok.vocab_size} (padded {tok.padded_vocab_size}) "
          f"eos_id={tok.eos_id} pad_id={tok.pad_id} in {time.time() - t0:.1f}s; "
          f"skipped {skips.count} non-UTF-8 files")
    for rel, why in skips.skipped:
        print(f"  skipped {rel}: {why}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
