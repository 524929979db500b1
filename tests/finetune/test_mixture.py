"""Multi-task sampling: proportions by weight and by temperature, epoch coverage, exact resume, packing."""

import numpy as np
import pytest
import torch

from finetune_helpers import write_jsonl
from gptforge.data.augment import AugmentConfig
from gptforge.data.sft import IGNORE_INDEX
from gptforge.finetune.mixture import MultiTaskSource, mixture_probabilities
from gptforge.finetune.recipe import TaskRecipe
from gptforge.finetune.runner import build_task


def make_tasks(tmp_path, tokenizer, sizes):
    tasks = []
    for i, n in enumerate(sizes):
        path = write_jsonl(tmp_path / f"t{i}.jsonl", [{"prompt": f"{i}:{j}=", "completion": f"T{i}"} for j in range(n)])
        tasks.append(build_task(TaskRecipe(data=path, name=f"t{i}", val_fraction=0.0), tokenizer))
    return tasks


def test_mixture_probabilities_formulas():
    assert np.allclose(mixture_probabilities([10, 1000], [3, 1]), [0.75, 0.25])
    assert np.allclose(mixture_probabilities([100, 400], [1, 1], "temperature", 1.0), [0.2, 0.8])
    assert np.allclose(mixture_probabilities([100, 400], [1, 1], "temperature", 2.0), [1 / 3, 2 / 3])
    assert np.allclose(mixture_probabilities([100, 400], [1, 1], "temperature", 1e9), [0.5, 0.5])
    with pytest.raises(ValueError, match="data.mixing"):
        mixture_probabilities([1], [1], "uniform")


@pytest.mark.parametrize("mixing, weights, temperature", [("weights", [3.0, 1.0], 1.0),
                                                           ("temperature", [1.0, 1.0], 2.0)])
def test_sampled_proportions_match_the_mixture(tmp_path, tokenizer, mixing, weights, temperature):
    tasks = make_tasks(tmp_path, tokenizer, [20, 80])
    for t, w in zip(tasks, weights):
        t.weight = w
    p = mixture_probabilities([len(t.train) for t in tasks], weights, mixing, temperature)
    source = MultiTaskSource(tasks, tokenizer, batch_size=50, max_len=16, probabilities=p, seed=3)
    counts = np.zeros(2)
    for _ in range(40):
        x, y = source.next_batch()
        # Each row's task is visible in its completion ("T0" / "T1"): count from the batch, not the bookkeeping.
        targets = [tokenizer.decode([t for t in row.tolist() if t != IGNORE_INDEX]) for row in y]
        counts += [sum(t.startswith("T0") for t in targets), sum(t.startswith("T1") for t in targets)]
    observed = counts / counts.sum()
    assert np.allclose(observed, p, atol=0.03), (observed, p)
    assert counts.tolist() == source.drawn


def test_each_epoch_visits_every_example_once(tmp_path, tokenizer):
    tasks = make_tasks(tmp_path, tokenizer, [12])
    source = MultiTaskSource(tasks, tokenizer, batch_size=4, max_len=16, probabilities=[1.0], seed=0)
    seen = []
    for _ in range(3):
        x, _ = source.next_batch()
        seen += [tokenizer.decode(row.tolist()).split("=")[0] for row in x]
    assert sorted(seen) == sorted(f"0:{j}" for j in range(12))


def test_source_resumes_exactly(tmp_path, tokenizer):
    tasks = make_tasks(tmp_path, tokenizer, [7, 5])
    kwargs = dict(batch_size=3, max_len=16, probabilities=[0.5, 0.5], seed=1,
                  augment=AugmentConfig(deletion=0.3))
    a = MultiTaskSource(tasks, tokenizer, **kwargs)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(4)]
    b = MultiTaskSource(tasks, tokenizer, **kwargs)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.next_batch() for _ in range(4)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_packing_fills_rows(tmp_path, tokenizer):
    tasks = make_tasks(tmp_path, tokenizer, [30])
    plain = MultiTaskSource(tasks, tokenizer, batch_size=4, max_len=40, probabilities=[1.0])
    packed = MultiTaskSource(tasks, tokenizer, batch_size=4, max_len=40, probabilities=[1.0], packing=True)
    x_plain, _ = plain.next_batch()
    x_packed, y_packed = packed.next_batch()
    assert x_packed.shape[1] <= 40
    assert int((y_packed != IGNORE_INDEX).sum()) > 2 * int((plain.next_batch()[1] != IGNORE_INDEX).sum())
    eos = tokenizer.eos_token_id
    assert all(int((row == eos).sum()) >= 3 for row in x_packed)  # several examples per row
