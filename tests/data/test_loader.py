"""Pretraining batches from token shards: shapes, shifts, determinism, resume and rank interleaving."""

import numpy as np
import pytest
import torch

from gptforge.data.corpus import CorpusError
from gptforge.data.loader import TokenWindowLoader, eval_windows
from gptforge.data.shards import prepare_corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(5000))
    (root / "t.txt").write_text(text)
    return prepare_corpus([str(root / "t.txt")], root / "out", tokenizer="char", val_fraction=0.1,
                          shard_tokens=1000, progress=False)


def test_windows_are_contiguous_and_labels_shifted(prepared):
    loader = TokenWindowLoader(prepared, "train", batch_size=6, seq_len=32, seed=3)
    stream = prepared.tokens("train").astype(np.int64)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (6, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        starts = np.flatnonzero(stream[: len(stream) - 32] == row[0])
        assert any(np.array_equal(stream[s:s + 33], row) for s in starts)


def test_same_seed_same_batches_and_exact_resume(prepared):
    a = TokenWindowLoader(prepared, batch_size=4, seq_len=16, seed=1)
    b = TokenWindowLoader(prepared, batch_size=4, seq_len=16, seed=1)
    seq_a = [a.next_batch()[0] for _ in range(5)]
    for _ in range(2):
        b.next_batch()
    state = b.state_dict()
    c = TokenWindowLoader(prepared, batch_size=4, seq_len=16, seed=1)
    c.load_state_dict(state)
    assert all(torch.equal(seq_a[i], c.next_batch()[0]) for i in range(2, 5))
    other = TokenWindowLoader(prepared, batch_size=4, seq_len=16, seed=2)
    assert not torch.equal(seq_a[0], other.next_batch()[0])
    with pytest.raises(ValueError, match="seq_len"):
        TokenWindowLoader(prepared, batch_size=4, seq_len=8, seed=1).load_state_dict(state)


def test_ranks_interleave_the_single_process_stream(prepared):
    single = TokenWindowLoader(prepared, batch_size=2, seq_len=16, seed=5)
    ranks = [TokenWindowLoader(prepared, batch_size=2, seq_len=16, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for r in range(2):
            assert torch.equal(single.next_batch()[0], ranks[r].next_batch()[0])


def test_val_windows_are_fixed_and_cover_the_split(prepared):
    batches = list(eval_windows(prepared, "val", seq_len=50, batch_size=4))
    n_val = prepared.num_tokens("val")
    assert sum(x.shape[0] for x, _ in batches) == (n_val - 1) // 50
    again = list(eval_windows(prepared, "val", seq_len=50, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    capped = list(eval_windows(prepared, "val", seq_len=50, batch_size=4, max_tokens=100))
    assert sum(x.shape[0] for x, _ in capped) == 2


def test_split_too_small_for_a_window(prepared):
    with pytest.raises(CorpusError, match="not enough for one window"):
        TokenWindowLoader(prepared, "val", batch_size=2, seq_len=4000)
