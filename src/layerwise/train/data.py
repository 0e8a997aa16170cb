"""Training text: local files, tokenized, packed into fixed-length sequences, split once.

Every file is one document, every JSONL line (``{"text": ...}``) too. Documents are tokenized,
each followed by an end-of-sequence token, and concatenated into one stream that is cut into
windows of ``seq_len + 1`` tokens (stride ``seq_len``, so every token but the first is a target
exactly once). A seeded permutation holds a share of the windows out for evaluation; the rest
are visited in a fresh seeded order every epoch. Where training stands is a single number, the
count of windows consumed, so a checkpoint restores it exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


class DataError(ValueError):
    """The data or tokenizer cannot be read or does not fit the settings."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, and 256 as the end of a document."""

    vocab_size = 257
    eos_id: int | None = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A local HuggingFace tokenizer directory (nothing is downloaded)."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise DataError(f"--tokenizer {path}: not a directory (give a local HuggingFace tokenizer folder)")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"--tokenizer {path}: cannot load a tokenizer from it ({str(e).splitlines()[0]})") from None
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def save(self, folder: str) -> None:
        """Beside a saved model, so that ``AutoTokenizer.from_pretrained(folder)`` finds it."""
        self._tok.save_pretrained(folder)


def load_tokenizer(path: str | None) -> Tokenizer:
    return ByteTokenizer() if path is None else HFTokenizer(path)


def data_files(path: str) -> list[str]:
    """The file itself, or every visible file under the folder, in sorted order."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"--data {path}: no such file or folder")
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, f) for f in sorted(files) if not f.startswith(".")]
    if not found:
        raise DataError(f"--data {path}: the folder holds no files")
    return found


def documents(path: str) -> Iterator[str]:
    """The documents of a file or folder: a text file is one, a JSONL line (``text`` field) is one."""
    for name in data_files(path):
        try:
            with open(name, encoding="utf-8") as f:
                if name.endswith(".jsonl"):
                    for lineno, line in enumerate(f, 1):
                        if line.strip():
                            yield _jsonl_text(line, name, lineno)
                else:
                    yield f.read()
        except UnicodeDecodeError:
            raise DataError(f"--data: {name} is not UTF-8 text; remove it or convert it") from None


def _jsonl_text(line: str, name: str, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except ValueError:
        raise DataError(f"--data: {name}:{lineno} is not JSON") from None
    text = obj.get("text") if isinstance(obj, dict) else obj
    if not isinstance(text, str):
        raise DataError(f"--data: {name}:{lineno} has no string \"text\" field")
    return text


def tokenize(path: str, tokenizer: Tokenizer) -> torch.Tensor:
    """One stream of token ids: every document followed by the end-of-sequence token (if any)."""
    ids: list[int] = []
    for doc in documents(path):
        ids += tokenizer.encode(doc)
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def cache_key(path: str, tokenizer: str | None) -> str:
    """Names the token stream of these files (paths, sizes, modification times) and tokenizer."""
    parts = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in data_files(path)]
    if tokenizer is not None:
        parts += [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in data_files(tokenizer)]
    blob = json.dumps({"files": parts, "tokenizer": tokenizer and os.path.abspath(tokenizer), "version": 1})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_tokens(path: str, tokenizer: Tokenizer, tokenizer_path: str | None, folder: str,
                  *, write: bool, wait: Callable[[], None]) -> torch.Tensor:
    """The token stream of ``path``, tokenized once and kept in ``folder`` as ``tokens-<key>.npy``.

    Every rank needs the stream; only the ``write`` rank tokenizes (when the cache misses) while
    the others ``wait`` (a barrier), then all read the file. Written to a temporary name and
    renamed, so a crash never leaves a partial cache. Read with ``allow_pickle=False``.
    """
    import numpy as np

    file = os.path.join(folder, f"tokens-{cache_key(path, tokenizer_path)}.npy")
    if write and not os.path.exists(file):
        os.makedirs(folder, exist_ok=True)
        ids = tokenize(path, tokenizer).numpy().astype(np.int32)  # vocabularies stay below 2**31
        tmp = file + ".tmp.npy"
        np.save(tmp, ids, allow_pickle=False)
        os.replace(tmp, file)
    wait()
    return torch.from_numpy(np.load(file, allow_pickle=False).astype(np.int64))


@dataclass(frozen=True, kw_only=True)
class Split:
    train: torch.Tensor  # window indices (long)
    eval: torch.Tensor


class PackedData:
    """Windows of ``seq_len + 1`` tokens from a stream, a held-out split and a training order.

    ``batch(position)`` depends only on the position and the seed, so every rank draws the same
    batches and a restored position continues exactly where a run stopped.
    """

    def __init__(
        self, stream: torch.Tensor, *, seq_len: int, batch_size: int, seed: int,
        eval_fraction: float, eval_max: int,
    ) -> None:  # fmt: skip
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        count = (stream.numel() - 1) // seq_len if stream.numel() > 1 else 0
        n_eval = min(eval_max, max(1, round(count * eval_fraction))) if eval_max > 0 else 0
        if count - n_eval < 1:
            need = (n_eval + 1) * seq_len + 1
            raise DataError(
                f"--data holds {stream.numel()} tokens: too few for --seq-len {seq_len} "
                f"({need} needed for one training and {n_eval} held-out sequence(s)); "
                "use a smaller --seq-len or more text"
            )
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        self.split = Split(train=order[n_eval:].sort().values, eval=order[:n_eval].sort().values)
        self.position = 0  # training windows consumed so far, over all epochs
        self._epoch_order: tuple[int, torch.Tensor] | None = None

    @property
    def train_sequences(self) -> int:
        return int(self.split.train.numel())

    @property
    def eval_sequences(self) -> int:
        return int(self.split.eval.numel())

    def window(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return self.stream[start : start + self.seq_len + 1]

    def _order(self, epoch: int) -> torch.Tensor:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._epoch_order = (epoch, self.split.train[torch.randperm(self.train_sequences, generator=g)])
        return self._epoch_order[1]

    def batch(self, position: int) -> torch.Tensor:
        """``batch_size`` windows starting at ``position`` in the training order: (batch, seq_len + 1)."""
        n = self.train_sequences
        rows = []
        for p in range(position, position + self.batch_size):
            rows.append(self.window(int(self._order(p // n)[p % n])))
        return torch.stack(rows)

    def next_batch(self) -> torch.Tensor:
        out = self.batch(self.position)
        self.position += self.batch_size
        return out

    def eval_batches(self, min_rows: int = 1) -> Iterator[torch.Tensor]:
        """The held-out windows in order, ``batch_size`` at a time. The last batch may be shorter;
        one shorter than ``min_rows`` (data-parallel replicas need a row each) joins the one before."""
        idx = self.split.eval.tolist()
        cuts = list(range(0, len(idx), self.batch_size)) + [len(idx)]
        if len(cuts) > 2 and cuts[-1] - cuts[-2] < min_rows:
            del cuts[-2]
        for a, b in zip(cuts, cuts[1:]):
            yield torch.stack([self.window(j) for j in idx[a:b]])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "train_sequences": self.train_sequences}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["train_sequences"] != self.train_sequences:
            raise DataError(
                f"the checkpoint's data had {state['train_sequences']} training sequences with seed "
                f"{state['seed']}, this run's has {self.train_sequences} with seed {self.seed}: resume "
                "with the same --data, --tokenizer, --seq-len and seed"
            )
        self.position = int(state["position"])
