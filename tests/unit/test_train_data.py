"""Packing text into windows, the held-out split, the training order and its saved position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerwise.train.data import ByteTokenizer, DataError, PackedData, documents, tokenize


def _data(n: int = 1000, seq_len: int = 10, batch_size: int = 4, seed: int = 0, eval_max: int = 256) -> PackedData:
    stream = torch.randperm(n, generator=torch.Generator().manual_seed(n)) % 200  # recognizable windows
    return PackedData(stream, seq_len=seq_len, batch_size=batch_size, seed=seed, eval_fraction=0.1, eval_max=eval_max)


def test_windows_tile_the_stream_with_one_token_overlap() -> None:
    d = _data(n=1001, seq_len=10)
    count = d.train_sequences + d.eval_sequences
    assert count == 100  # (1001 - 1) // 10
    for i in range(count):
        w = d.window(i)
        assert w.numel() == 11 and torch.equal(w, d.stream[i * 10 : i * 10 + 11])
    # every token but the first is a target exactly once: window i's targets start where window i-1's end
    targets = torch.cat([d.window(i)[1:] for i in range(count)])
    assert torch.equal(targets, d.stream[1:1001])


def test_held_out_split_is_disjoint_seeded_and_capped() -> None:
    d = _data()
    train, held = set(d.split.train.tolist()), set(d.split.eval.tolist())
    assert not train & held and len(train) + len(held) == 99 and len(held) == 10
    assert torch.equal(_data().split.eval, d.split.eval)
    assert not torch.equal(_data(seed=1).split.eval, d.split.eval)
    assert _data(eval_max=3).eval_sequences == 3
    assert _data(eval_max=0).eval_sequences == 0


def test_every_epoch_visits_each_training_window_once_in_a_new_order() -> None:
    d = _data(n=401, seq_len=10, batch_size=6)  # 40 windows, 4 held out, 36 to train
    assert d.train_sequences == 36
    seen = [tuple(w.tolist()) for p in range(0, 72, 6) for w in d.batch(p)]
    epoch0, epoch1 = seen[:36], seen[36:]
    train_windows = {tuple(d.window(i).tolist()) for i in d.split.train.tolist()}
    assert set(epoch0) == set(epoch1) == train_windows and len(set(epoch0)) == 36
    assert epoch0 != epoch1
    straddling = d.batch(33)  # three windows from epoch 0, three from epoch 1
    assert [tuple(w.tolist()) for w in straddling] == seen[33:39]


def test_a_restored_position_continues_exactly() -> None:
    a = _data()
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # it travels as JSON in the checkpoint
    b = _data()
    b.load_state_dict(state)
    for _ in range(30):  # across an epoch boundary
        assert torch.equal(a.next_batch(), b.next_batch())
    with pytest.raises(DataError, match="same --data"):
        _data(seed=3).load_state_dict(state)


def test_eval_batches_cover_the_held_out_windows_in_order() -> None:
    d = _data(batch_size=4)
    rows = torch.cat(list(d.eval_batches()))
    assert rows.shape == (10, 11)
    assert torch.equal(rows, torch.stack([d.window(i) for i in d.split.eval.tolist()]))


def test_too_little_text_is_refused_with_what_to_do() -> None:
    with pytest.raises(DataError, match="smaller --seq-len"):
        _data(n=15, seq_len=10)


def test_text_and_jsonl_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("héllo")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    (tmp_path / ".hidden.txt").write_text("skipped")
    assert list(documents(str(tmp_path))) == ["one", "two", "héllo"]
    ids = tokenize(str(tmp_path), ByteTokenizer()).tolist()
    assert ids == [*b"one", 256, *b"two", 256, *"héllo".encode(), 256]
    (tmp_path / "c.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1 has no string \"text\""):
        list(documents(str(tmp_path)))
    (tmp_path / "c.jsonl").unlink()
    (tmp_path / "d.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="d.bin is not UTF-8"):
        list(documents(str(tmp_path)))
    with pytest.raises(DataError, match="no such file"):
        list(documents(str(tmp_path / "missing")))


def test_a_local_huggingface_tokenizer_directory(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "pipeline": 3, "world": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("hello pipeline world")
    (tmp_path / "b.txt").write_text("world hello mystery")
    from layerwise.train.data import HFTokenizer

    tok = HFTokenizer(str(tmp_path / "tok"))
    assert (tok.vocab_size, tok.eos_id) == (5, 1)
    assert tokenize(str(tmp_path / "a.txt"), tok).tolist() == [2, 3, 4, 1]
    (tmp_path / "docs").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).rename(tmp_path / "docs" / name)
    assert tokenize(str(tmp_path / "docs"), tok).tolist() == [2, 3, 4, 1, 4, 2, 0, 1]
    with pytest.raises(DataError, match="--tokenizer"):
        HFTokenizer(str(tmp_path / "docs"))
    tok.save(str(tmp_path / "final"))  # beside the trained model
    assert HFTokenizer(str(tmp_path / "final")).encode("world pipeline") == [4, 3]


def test_the_token_stream_is_cached_and_refreshed_when_the_text_changes(tmp_path: Path) -> None:
    from layerwise.train.data import cached_tokens

    text = tmp_path / "t.txt"
    text.write_text("abc")
    calls: list[int] = []
    get = lambda write: cached_tokens(str(text), ByteTokenizer(), None, str(tmp_path / "cache"), write=write,  # noqa: E731
                                      wait=lambda: calls.append(1))
    assert get(True).tolist() == [97, 98, 99, 256] and len(calls) == 1
    (cache,) = (tmp_path / "cache").iterdir()
    assert cache.suffix == ".npy"
    assert get(False).tolist() == [97, 98, 99, 256]  # another rank: reads, never writes
    text.write_text("abcd")
    assert get(True).tolist() == [97, 98, 99, 100, 256]
    assert len(list((tmp_path / "cache").iterdir())) == 2
