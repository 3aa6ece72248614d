"""seqio.Vocabulary over the byte-level BPE tokenizer.json (imports seqio/tf).

The tokenizer is Rust code behind a Python API, so in-graph ops go through
tf.numpy_function (static rank, int32) -- fine for host-side input pipelines,
not serialisable into a SavedModel, which phijax does not need.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Union

import numpy as np
import seqio
import tensorflow as tf

from phijax.data.vocab import BPETokenizer

PathOrFactory = Union[str, os.PathLike, Callable[[], Union[str, os.PathLike]]]


class HFBPEVocabulary(seqio.Vocabulary):
    """``tokenizer_path`` may be a callable so that registering a task at import
    time does not train/load the tokenizer; it is resolved on first use."""

    def __init__(self, tokenizer_path: PathOrFactory, extra_ids: int = 0):
        if extra_ids:
            # Sentinel ids would sit above the BPE vocab and decode to nothing.
            raise ValueError("HFBPEVocabulary does not support extra_ids")
        super().__init__(extra_ids=0)
        self._path_or_factory = tokenizer_path
        self._tok: BPETokenizer | None = None
        self._lock = threading.Lock()  # tf.data calls us from several threads

    @property
    def tokenizer(self) -> BPETokenizer:
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    p = self._path_or_factory
                    self._tok = BPETokenizer(p() if callable(p) else Path(p))
        return self._tok

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer.path

    @property
    def fingerprint(self) -> str:
        return self.tokenizer.fingerprint

    # --- seqio.Vocabulary abstract API -------------------------------------
    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def pad_id(self) -> int:
        # Always 0 (seqio PAD_ID): <|pad|> in our tokenizers, a real token ("!") in
        # pad-less GPT-2/codegen files, where padding is marked by segment ids
        # and loss weights instead (see phijax.data.vocab).
        return self.tokenizer.pad_id

    @property
    def unk_id(self) -> None:
        return None  # byte-level BPE has no unknown token

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s) -> list[int]:
        if isinstance(s, bytes):
            s = s.decode("utf-8")
        return self.tokenizer.encode(s)

    def _decode(self, ids) -> str:
        """One row's text: cut at its first EOS -- what follows is padding, and with
        GPT-2/codegen files (no pad token) seqio's pad id 0 is the real token "!" --
        with special tokens dropped, as SentencePiece vocabularies do. Every decode
        path (``decode``, ``decode_tf``) goes through here."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        s = tf.convert_to_tensor(s, dtype=tf.string)
        if s.shape.rank == 0:
            ids = tf.numpy_function(self._np_encode_one, [s], tf.int32, stateful=False)
            ids.set_shape([None])
            return ids
        if s.shape.rank == 1:  # batch of strings -> RaggedTensor [B, None]
            flat, lens = tf.numpy_function(
                self._np_encode_many, [s], [tf.int32, tf.int64], stateful=False)
            flat.set_shape([None])
            lens.set_shape(s.shape)
            return tf.RaggedTensor.from_row_lengths(flat, lens)
        raise ValueError(f"encode_tf expects a scalar or 1-D string tensor, got rank {s.shape.rank}")

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        ids = tf.convert_to_tensor(ids)
        if ids.shape.rank is None or ids.shape.rank < 1:
            raise ValueError("decode_tf expects ids of rank >= 1")
        lead = tf.shape(ids)[:-1]
        flat = tf.reshape(ids, [-1, tf.shape(ids)[-1]])
        out = tf.numpy_function(self._np_decode_rows, [flat], tf.string, stateful=False)
        return tf.reshape(out, lead)

    # --- numpy bodies (run under tf.numpy_function) -------------------------
    def _np_encode_one(self, s) -> np.ndarray:
        # Eager numpy_function hands over a 0-d object array, graph mode bytes.
        s = s.item() if isinstance(s, np.ndarray) else s
        return np.asarray(self.tokenizer.encode(s.decode("utf-8")), dtype=np.int32)

    def _np_encode_many(self, s: np.ndarray):
        rows = self.tokenizer.encode_batch([x.decode("utf-8") for x in s])
        flat = np.fromiter((i for r in rows for i in r), dtype=np.int32)
        return flat, np.asarray([len(r) for r in rows], dtype=np.int64)

    def _np_decode_rows(self, rows: np.ndarray) -> np.ndarray:
        out = [self._decode(r.tolist()).encode("utf-8") for r in rows]
        return np.asarray(out, dtype=object)

    # seqio compares vocabularies (e.g. across a Mixture's tasks).
    def __eq__(self, other) -> bool:
        return isinstance(other, HFBPEVocabulary) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(("HFBPEVocabulary", self.fingerprint))

    def __repr__(self) -> str:
        p = self._path_or_factory
        return f"HFBPEVocabulary({p if not callable(p) else '<lazy>'})"
