"""Held-out Python: the sample, bits per byte and next-line exact match, with known answers for each."""

import json
import math
import textwrap

import numpy as np
import pytest
import torch

from gptforge import GPT
from gptforge.data.corpus import stdlib_files, stdlib_root
from gptforge.eval import heldout as H
from gptforge.tokenizer import Tokenizer

CODE = textwrap.dedent('''\
    import os


    def walk_sizes(root):
        """Total size of the files under root."""
        total = 0
        for dirpath, dirnames, filenames in os.walk(root):
            for name in filenames:
                total += os.path.getsize(os.path.join(dirpath, name))
        return total


    class Counter:
        def __init__(self, start=0):
            self.value = start

        def increment(self, step=1):
            self.value += step
            return self.value
    ''')
TABLE = "TABLE = {\n" + "".join(f"    0x{i:04x}: 0x{(i * 7) % 256:04x},  # ENTRY {i}\n" for i in range(60)) + "}\n"


def fake_distribution(root, name="fakepkg", files=None):
    """A package installed under `root` with a dist-info RECORD, as pip would leave it."""
    files = files or {}
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in files) + f"{info.name}/METADATA,,\n")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    fake_distribution(tmp_path, files={
        "fakepkg/__init__.py": CODE,
        "fakepkg/tests/test_walk.py": "def test_walk():\n    assert walk_sizes('.') >= 0\n",
        "fakepkg/table_data.py": TABLE,
        "fakepkg/copied.py": (stdlib_root() / "bisect.py").read_text(encoding="utf-8"),
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


# ---- the held-out sample ------------------------------------------------------------------------

def test_sample_leaves_out_tests_tables_and_stdlib_copies(fake_package):
    sample = H.load_heldout_python(["fakepkg", "no-such-package-xyz"])
    assert {c.path for c in sample.chunks} == {"fakepkg/__init__.py"}
    assert "".join(c.text for c in sample.chunks) == CODE  # whole lines, nothing lost or repeated
    assert sample.versions == {"fakepkg": "1.0"}
    assert sample.left_out == {"tests or vendored code": 1, "machine-generated data": 1,
                               "a copy of a standard-library file": 1}
    assert len(sample.missing) == 1 and "no-such-package-xyz is not installed" in sample.missing[0]
    assert H.load_heldout_python(["fakepkg"]).fingerprint == sample.fingerprint
    with pytest.raises(FileNotFoundError, match="no held-out Python found"):
        H.load_heldout_python(["no-such-package-xyz"])


def test_installed_sample_is_deterministic_and_not_the_standard_library():
    sample = H.load_heldout_python()
    if not sample.chunks:
        pytest.skip("none of gptforge's pure-Python dependencies is installed")
    assert H.load_heldout_python().fingerprint == sample.fingerprint
    stdlib_texts = {p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()}
    assert not any(c.text in stdlib_texts for c in sample.chunks)
    assert all(c.package in H.HELDOUT_PACKAGES for c in sample.chunks)
    assert sample.num_bytes <= H.PACKAGE_BYTES * len(sample.versions)


# ---- next-line exact match ----------------------------------------------------------------------

def test_predicted_line_rules():
    assert H.predicted_line("\n    return x\n") == "    return x"
    assert H.predicted_line("  \n\n\ndef f():   \n") == "def f():"  # blank lines skipped, trailing space ignored
    assert H.predicted_line("(a, b)\n    return x\n") is None  # did not end the prompt's line
    assert H.predicted_line("\n    return x") is None  # cut inside the line
    assert H.predicted_line("\n    return x", finished=True) == "    return x"  # ... unless generation ended
    assert H.predicted_line("") is None


def test_examples_skip_trivial_lines_and_keep_indentation():
    sample = H.HeldoutSet([H.HeldoutChunk("p", "m.py", 0, CODE, "")], {"p": "1"})
    examples = H.next_line_examples(sample, max_lines=100)
    targets = {e.target for e in examples}
    assert "        self.value = start" in targets and "    def increment(self, step=1):" in targets
    assert "import os" not in targets  # no text before it: nothing to condition on
    assert not any(len(t.strip()) < H.MIN_LINE_CHARS for t in targets)
    for e in examples:
        assert CODE.startswith(e.prompt) and not e.prompt.endswith((" ", "\n"))
        assert e.target in CODE[len(e.prompt):].split("\n")
    assert H.next_line_examples(sample, max_lines=3) == H.next_line_examples(sample, max_lines=100)[:3]


def test_exact_match_of_an_oracle_a_baseline_and_a_wrong_answer():
    text = "x = compute(1)\nx = compute(1)\ny = compute(2)\nz = compute(3)\n"
    sample = H.HeldoutSet([H.HeldoutChunk("p", "m.py", 0, text, "")], {"p": "1"})
    examples = H.next_line_examples(sample)
    assert [e.target for e in examples] and len(examples) == 3
    oracle = [("\n" + e.target + "\n", False) for e in examples]
    assert H.exact_match_rate(examples, oracle) == 1.0
    # Repeating the previous line is right only where a line repeats: 1 of 3 here.
    assert H.exact_match_rate(examples, H.repeat_previous_line(examples)) == pytest.approx(1 / 3)
    assert H.exact_match_rate(examples, [(e.target + "\n", False) for e in examples]) == 0.0


@pytest.mark.parametrize("text, looped", [
    ("____________________", True),
    (" that; thecomp interface..m,..compcomp theself  +", False),  # noise, but not a loop
    ("\n    return x\n    return x\n    return x\n", True),
    ("self.self.self.self.self.self.self.", True),
    ("\n    x = 1\n    y = 2\n    return x + y\n", False),
    (")\n)\n)\n", False),  # short lines may repeat in real code
    ("    # -----", False),
])
def test_degenerate_completions(text, looped):
    assert H.is_degenerate(text) is looped


def test_real_code_is_rarely_degenerate():
    windows = [CODE[i:i + 200] for i in range(0, len(CODE) - 200, 20)]
    assert not any(H.is_degenerate(w) for w in windows)


# ---- bits per byte ------------------------------------------------------------------------------

class NextCharOracle(torch.nn.Module):
    """Knows the text: puts (almost) all probability on the true next token of each position."""

    def __init__(self, successor: dict[int, int], vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.table = torch.full((vocab_size, vocab_size), -30.0)
        for token, nxt in successor.items():
            self.table[token, nxt] = 30.0
        self.config = type("C", (), {"vocab_size": vocab_size, "block_size": block_size})()

    def forward(self, input_ids, **_):
        return self.table[input_ids]


def _char_setup():
    text = "abcdefghijklmnopqrstuvwxyz0123456789"  # every character once: the next one follows from the last
    tokenizer = Tokenizer.train_char([text], special_tokens=["<|endoftext|>"])
    ids = [tokenizer.eos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    return text, tokenizer, ids


def test_bits_per_byte_known_answers():
    text, tokenizer, ids = _char_setup()
    vocab = tokenizer.vocab_size
    oracle = NextCharOracle(dict(zip(ids, ids[1:])), vocab, block_size=8)
    perfect = H.bits_per_byte(oracle, tokenizer, [text, text])
    assert perfect["tokens"] == 2 * len(text) and perfect["bytes"] == 2 * len(text)
    assert perfect["bits_per_byte"] < 1e-6
    # A uniform model pays log2(vocab) bits for every token: one byte each here.
    uniform = H.UnigramLM(np.full(vocab, -math.log(vocab)), block_size=8)
    assert H.bits_per_byte(uniform, tokenizer, [text])["bits_per_byte"] == pytest.approx(math.log2(vocab), rel=1e-5)


def test_unigram_baseline_through_the_same_code():
    logp = H.unigram_log_probs(np.array([0, 0, 1, 3]), vocab_size=5)
    assert np.exp(logp).sum() == pytest.approx(1.0) and np.exp(logp[0]) == pytest.approx(3 / 9)
    text, tokenizer, ids = _char_setup()
    counts = np.bincount(ids[1:], minlength=tokenizer.vocab_size)
    expected = -np.log2((counts[ids[1:]] + 1) / (counts.sum() + tokenizer.vocab_size)).sum() / len(text)
    model = H.UnigramLM(H.unigram_log_probs(np.array(ids[1:]), tokenizer.vocab_size), block_size=16)
    assert H.bits_per_byte(model, tokenizer, [text])["bits_per_byte"] == pytest.approx(expected, rel=1e-5)


# ---- a model that learned the code, end to end -------------------------------------------------

def _memorizer(text: str, steps: int = 120):
    """A tiny GPT trained until it has memorized `text` (the held-out file), with its tokenizer."""
    tokenizer = Tokenizer.train_bpe([text] * 4, vocab_size=300)
    ids = torch.tensor([tokenizer.eos_token_id] + tokenizer.encode(text, add_special_tokens=False))[None]
    assert ids.shape[1] < 256
    torch.manual_seed(0)
    model = GPT.from_config("llama-nano", vocab_size=tokenizer.vocab_size, block_size=256, n_embd=64,
                            n_layer=2, n_head=4, n_kv_head=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):  # the whole file is one training sequence, after the document separator
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def test_a_model_that_memorized_the_code_scores_well_and_a_random_one_does_not(fake_package):
    torch.set_num_threads(1)
    sample = H.load_heldout_python(["fakepkg"])
    learned, tokenizer = _memorizer(CODE)
    unigram = H.stdlib_unigram(tokenizer, tokenizer.vocab_size, block_size=256, max_bytes=20_000)
    good = H.evaluate_heldout_python(learned, tokenizer, heldout=sample, batch_size=8, baseline=unigram)
    torch.manual_seed(1)
    random = GPT.from_config("llama-nano", vocab_size=tokenizer.vocab_size, block_size=256, n_embd=64).eval()
    bad = H.evaluate_heldout_python(random, tokenizer, heldout=sample, batch_size=8, baseline=unigram)
    assert good.lines == bad.lines == len(H.next_line_examples(sample)) > 5
    assert good.next_line_exact_match == 1.0, good.examples
    assert bad.next_line_exact_match == 0.0
    assert good.bits_per_byte < 0.1 < 2.0 < good.unigram_bits_per_byte
    assert bad.bits_per_byte > good.unigram_bits_per_byte  # untrained is worse than token frequencies
    assert good.unigram_bits_per_byte == bad.unigram_bits_per_byte  # the baseline does not depend on the model
    assert good.repeat_line_exact_match == bad.repeat_line_exact_match == 0.0
    assert "bits per byte" in good.summary() and "next-line exact match" in good.summary()


def test_eval_command_reports_heldout_python(fake_package, model_dir, tmp_path, monkeypatch, capsys):
    from gptforge.cli import main

    monkeypatch.setattr(H, "HELDOUT_PACKAGES", ("fakepkg",))
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(model_dir), "--heldout-python", "--heldout-lines", "5",
                 "--output", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())["heldout_python"]
    assert report["lines"] == 5 and report["versions"] == {"fakepkg": "1.0"}
    assert 0.0 <= report["next_line_exact_match"] <= 1.0 and report["bits_per_byte"] > 0
    printed = capsys.readouterr().out
    assert "next_line_exact_match" in printed and "unigram_bits_per_byte" in printed
    assert main(["eval", "--model", str(model_dir), "--heldout-lines", "5"]) == 2
    assert "--heldout-lines belongs to --heldout-python" in capsys.readouterr().err
