"""Figures for people: rounded to what can be told apart, sizes in binary units, metric names in words."""

import math

import pytest

from gptforge.formatting import human_bytes, metric_phrase, round_figure


@pytest.mark.parametrize("value, shown", [(5.4741, "5.47"), (238.4417, "238"), (4174.1629, "4,174"),
                                          (0.8125, "0.812"), (0.01234, "0.0123"), (1.0, "1.00"), (0.0, "0"),
                                          (5.3958, "5.40"), (99.96, "100"), (12.0, "12.0"),
                                          (0.00001234, "1.23e-05"), (-2.5, "-2.50"), (math.inf, "inf")])
def test_round_figure(value, shown):
    assert round_figure(value) == shown


def test_metric_phrase_names_perplexity_in_words():
    assert metric_phrase("val_loss", 5.4741) == "val_loss 5.47"
    assert metric_phrase("val_ppl", 238.4417) == "perplexity 238"
    assert metric_phrase("test_ppl", 12.345) == "test perplexity 12.3"
    assert metric_phrase("accuracy", 0.8125) == "accuracy 0.812"


@pytest.mark.parametrize("size, shown", [(12, "12 bytes"), (1536, "1.5 KiB"), (560408, "547 KiB"),
                                         (91160, "89 KiB"), (1023 * 1024, "1,023 KiB"), (5 * 2**20, "5 MiB"),
                                         (3 * 2**30, "3 GiB"), (5000 * 2**30, "5,000 GiB")])
def test_human_bytes(size, shown):
    assert human_bytes(size) == shown
