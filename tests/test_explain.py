"""Explainability: attention weights against `transformers` eager attention, log-probabilities, CLI report."""

import json
import math

import pytest
import torch

from gptforge import GPT, Tokenizer
from gptforge.cli import main
from gptforge.explain import attention_maps, explain, format_table, write_report
from gptforge.loading import load_model, save
from hf_families import hf_model

transformers = pytest.importorskip("transformers")


def _hf_pair(kind, tmp_path):
    """A tiny random HF model with eager attention and the same weights loaded into gptforge."""
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, attn_implementation="eager")
        hf = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama-gqa":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2))
    elif kind == "mistral-window":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**common, num_key_value_heads=1,
                                                                        sliding_window=5))
    else:
        hf = hf_model(kind)  # the other families, eager attention (tests/hf_families.py)
    hf.eval()
    with torch.no_grad():  # move every weight off its 0/1 init so the comparison sees all of them
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / kind)
    return hf, load_model(tmp_path / kind).eval()


# Soft-capping (gemma2), QK-norm and per-layer RoPE bases (gemma3, qwen3, olmo2), per-layer windows
# (qwen3-window: 8 keys), partial rotary and LongRoPE past position 16 (phi4-mini), experts (mixtral).
FAMILIES = ["gemma2", "gemma3", "qwen3-window", "phi4-mini", "olmo2", "mixtral"]


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "mistral-window", *FAMILIES])
def test_attention_matches_transformers_eager(kind, tmp_path):
    hf, ours = _hf_pair(kind, tmp_path)
    t = 20 if kind in FAMILIES else 12  # long enough to pass the 8-key windows and LongRoPE's switch at 16
    ids = torch.randint(0, 97, (2, t))
    with torch.no_grad():
        ref = hf(ids, output_attentions=True)
    logits, maps = attention_maps(ours, ids)
    n_layer = ours.config.n_layer
    assert maps.shape == (n_layer, 2, 4, t, t)  # (layer, batch, head, query, key)
    for layer in range(n_layer):
        torch.testing.assert_close(maps[layer], ref.attentions[layer], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-5)  # rows are distributions
    assert torch.all(maps.triu(diagonal=1) == 0)  # causal: no weight on future keys


def test_recording_is_switched_off_afterwards(tmp_path):
    _, ours = _hf_pair("llama-gqa", tmp_path)
    ids = torch.randint(0, 97, (1, 5))
    logits, _ = attention_maps(ours, ids)
    assert all(not block.attn.record_weights and block.attn.weights is None for block in ours.blocks)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), logits, atol=1e-5, rtol=1e-5)  # the SDPA path gives the same


def test_attention_maps_come_from_the_model_forward(tmp_path):
    """A change to the model's attention shows in the maps: they are the model's, not a copy's."""
    _, ours = _hf_pair("llama-gqa", tmp_path)
    ids = torch.randint(0, 97, (1, 6))
    _, before = attention_maps(ours, ids)
    ours.blocks[0].attn.scale = 3.0  # sharper scores in layer 0 only
    _, after = attention_maps(ours, ids)
    assert not torch.allclose(before[0], after[0], atol=1e-3)
    assert torch.allclose(after.sum(-1), torch.ones(()), atol=1e-5)


@pytest.fixture
def tiny_model():
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=300)
    torch.manual_seed(0)
    model = GPT.from_config("llama-nano", vocab_size=tokenizer.vocab_size, block_size=64).eval()
    return model, tokenizer


def test_logprobs_alternatives_and_surprisal(tiny_model):
    model, tokenizer = tiny_model
    text = "def add(a, b): return a"
    result = explain(model, text, tokenizer, top_k=4)
    ids = tokenizer.encode(text)
    assert [t.token_id for t in result.tokens] == ids
    assert "".join(result.token_strings) == text
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    first = result.tokens[0]
    assert first.logprob is None and first.surprisal_bits is None and first.rank is None
    for t in result.tokens[1:]:
        row = ref[t.position - 1]
        assert t.logprob == pytest.approx(float(row[t.token_id]), abs=1e-5)
        assert t.surprisal_bits == pytest.approx(-t.logprob / math.log(2), rel=1e-6)
        assert t.rank == int((row > row[t.token_id]).sum()) + 1
        assert [a.token_id for a in t.top_alternatives] == row.topk(4).indices.tolist()
        assert [a.logprob for a in t.top_alternatives] == sorted((a.logprob for a in t.top_alternatives), reverse=True)
    nll = -sum(t.logprob for t in result.tokens[1:]) / (len(ids) - 1)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert result.attentions.shape == (2, 4, len(ids), len(ids))
    assert "perplexity" in format_table(result)


def test_rank_one_for_the_argmax_token(tiny_model):
    model, tokenizer = tiny_model
    with torch.no_grad():
        best = int(model(torch.tensor([[5]]))[0, -1].argmax())
    result = explain(model, [5, best], tokenizer, top_k=1)
    assert result.tokens[1].rank == 1 and result.tokens[1].top_alternatives[0].token_id == best


def test_bad_inputs_are_clear(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="zero tokens"):
        explain(model, "", tokenizer)
    with pytest.raises(ValueError, match="more than the limit of 3"):
        explain(model, "def add(a, b): return a + b", tokenizer, max_tokens=3)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        explain(model, [1, 10_000], tokenizer)
    with pytest.raises(ValueError, match="top_k"):
        explain(model, "def", tokenizer, top_k=-1)


def test_report_files(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    result = explain(model, "import os\nprint(os)", tokenizer)
    written = write_report(result, tmp_path / "out")
    page = written["html"].read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    data = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert data["attention_shape"] == [2, 4, len(result.tokens), len(result.tokens)]
    assert [p.name for p in written["attention_png"]] == ["layer_00.png", "layer_01.png"]
    for path in [*written["attention_png"], written["surprisal_png"]]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(written["json"].read_text())
    assert saved["tokens"][1]["logprob"] == pytest.approx(result.tokens[1].logprob, abs=1e-6)


def test_cli_explain(tiny_model, tmp_path, capsys):
    model, tokenizer = tiny_model
    save(tmp_path / "model", model, tokenizer)
    out = tmp_path / "report"
    assert main(["explain", "--model", str(tmp_path / "model"), "--text", "def add(a, b):",
                 "--out", str(out), "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "surprisal" in printed and "index.html" in printed
    assert (out / "index.html").is_file() and (out / "attention" / "layer_01.png").is_file()
    assert main(["explain", "--model", str(tmp_path / "model"), "--text", "def", "--out", str(out),
                 "--top-k", "-1"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main(["explain", "--model", str(tmp_path / "nope"), "--text", "x", "--out", str(out)]) == 2


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.slow
def test_report_page_in_headless_chromium(tiny_model, tmp_path):
    """The HTML page works offline in a real browser: tokens, hover details, attention view."""
    import os

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    model, tokenizer = tiny_model
    result = explain(model, "def add(a, b):", tokenizer)
    page = write_report(result, tmp_path / "report")["html"]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(page.as_uri())
        spans = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
        assert [s.get_attribute("textContent") for s in spans] == result.token_strings
        assert f"{len(result.tokens)} tokens" in driver.find_element(By.ID, "summary").text
        ActionChains(driver).move_to_element(spans[2]).perform()
        info = driver.find_element(By.ID, "info").text
        assert f"rank {result.tokens[2].rank}" in info and "expected:" in info
        surprisal_colours = [s.value_of_css_property("background-color") for s in spans]
        driver.execute_script("const m = document.getElementById('mode'); m.value = 'attention';"
                              "m.dispatchEvent(new Event('change'))")
        spans[-1].click()
        attention_colours = [s.value_of_css_property("background-color") for s in spans]
        assert attention_colours != surprisal_colours
        assert len(driver.find_elements(By.CSS_SELECTOR, "figure img")) == 1 + model.config.n_layer
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_large_attention_goes_to_npy(tiny_model, tmp_path, monkeypatch):
    import numpy as np

    from gptforge import explain as explain_module

    model, tokenizer = tiny_model
    result = explain(model, "import os\nprint(os)", tokenizer)
    monkeypatch.setattr(explain_module, "MAX_EMBEDDED_ATTENTION", 10)
    written = write_report(result, tmp_path / "big")
    stored = np.load(written["attention_npy"], allow_pickle=False)
    assert stored.shape == tuple(result.attentions.shape) and stored.dtype == np.float16
    assert np.allclose(stored, result.attentions.numpy(), atol=1e-3)
    assert "attentions" not in json.loads(written["json"].read_text())
    assert '"attentions"' not in written["html"].read_text()


# ---- what a person reads: the table, the labels, the pictures' size -----------------------------------

def test_table_shows_readable_tokens_and_percentages(tiny_model):
    from gptforge.explain import _label, _percent

    model, tokenizer = tiny_model
    result = explain(model, "def add(a, b):\n    return a + b", tokenizer, top_k=3)
    table = format_table(result)
    assert "\\n" not in table and "\\\\" not in table  # newlines are drawn (↵), never escaped, let alone twice
    newline_token = next(t for t in result.tokens if "\n" in t.token)
    assert f"'{_label(newline_token.token, 12)}'" in table and "↵" in _label(newline_token.token)
    for t in result.tokens[1:]:
        row = next(line for line in table.splitlines() if line.lstrip().startswith(f"{t.position}  "))
        assert _percent(math.exp(t.logprob)) in row and f"{t.logprob:.3f}" in row
        for a in t.top_alternatives:
            assert f"'{_label(a.token)}' {_percent(math.exp(a.logprob))}" in row
    assert " 0.00 " not in table and "0.00%" not in table
    assert table.splitlines()[-1].startswith(f"Mean surprisal {result.mean_surprisal_bits:.2f} bits per token")


@pytest.mark.parametrize("probability, shown", [(0.999, "99.9%"), (0.9996, "100%"), (0.4321, "43%"),
                                                (0.0213, "2.1%"), (0.00213, "0.21%"), (0.00002, "<0.01%")])
def test_percentages_keep_the_digits_that_matter(probability, shown):
    from gptforge.explain import _percent

    assert _percent(probability) == shown


def test_labels_draw_whitespace_once():
    from gptforge.explain import _label

    assert _label("\n    x") == "↵····x"
    assert _label("\t") == "⇥" and _label("") == "∅" and _label("\x00") == "\\x00"
    assert _label("abcdefghijklmnop", 8) == "abcdefg…"


def test_attention_png_fits_the_page_at_full_size(tiny_model):
    """The page is 1100 px wide: a PNG wider than that is shrunk, and its token labels with it."""
    import struct

    from gptforge.explain import attention_figure_png

    model, tokenizer = tiny_model
    for text in ("def add", "def add(a, b):\n    return a + b\n" * 2):
        result = explain(model, text, tokenizer)
        png = attention_figure_png(result.attentions[0], result.token_strings, "layer 0")
        width, height = struct.unpack(">II", png[16:24])
        assert 600 <= width <= 1000, (len(result.tokens), width)
