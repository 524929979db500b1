import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gptforge.cli import main  # noqa: E402
from gptforge.config import Config  # noqa: E402
from gptforge.interop.gguf import export_gguf, gguf_tensors, permute_for_llama_cpp, read_gguf_tensors  # noqa: E402
from gptforge.model import GPT, apply_rope, rope_cache  # noqa: E402
from gptforge.tokenizer import Tokenizer  # noqa: E402
from gptforge.loading import save

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 30


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT], 300)


def tiny(family: str) -> GPT:
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT(Config.from_name("nano", vocab_size=320, block_size=64)).eval()
    return GPT(Config.from_name("llama-nano", vocab_size=320, block_size=64, n_head=4, n_kv_head=2)).eval()


def _field(reader, key):
    field = reader.fields[key]
    return field.contents()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gguf_round_trip_names_shapes_metadata_values(tmp_path, tokenizer, family):
    model = tiny(family)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(str(path))
    c = model.config
    assert _field(reader, "general.architecture") == family
    assert _field(reader, f"{family}.block_count") == c.n_layer
    assert _field(reader, f"{family}.embedding_length") == c.n_embd
    assert _field(reader, f"{family}.feed_forward_length") == c.ffn_dim
    assert _field(reader, f"{family}.attention.head_count") == c.n_head
    assert _field(reader, f"{family}.attention.head_count_kv") == c.kv_heads
    assert _field(reader, f"{family}.context_length") == c.block_size
    if family == "llama":
        assert _field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
        assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size
    assert tokens[:tokenizer.vocab_size] == [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) > 0 and all(len(m.split(" ")) == 2 for m in merges)

    expected = {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_norm.weight",
                "blk.0.attn_output.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.1.ffn_norm.weight"}
    expected |= ({"position_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias"} if family == "gpt2"
                 else {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_gate.weight"})
    back = read_gguf_tensors(path)
    assert expected <= set(back)
    ours = gguf_tensors(model)
    assert set(back) == set(ours)
    for name, tensor in ours.items():
        assert back[name].shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(back[name], tensor.numpy(), err_msg=name)
    # gguf shapes are (cols, rows): the embedding is (n_embd, vocab) on disk
    info = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert info["token_embd.weight"] == [c.n_embd, c.vocab_size]


@pytest.mark.parametrize("outtype, kind, error", [("q8_0", "Q8_0", 1 / 100), ("q4_0", "Q4_0", 1 / 6),
                                                   ("bf16", "BF16", 1 / 200)])
def test_gguf_quantized_values_close(tmp_path, tokenizer, outtype, kind, error):
    model = tiny("llama")
    path = export_gguf(model, tmp_path / "q.gguf", tokenizer=tokenizer, outtype=outtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == getattr(gguf.GGMLQuantizationType, kind)
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert _field(reader, "general.file_type") == getattr(gguf.LlamaFileType, f"MOSTLY_{kind}")
    back, ours = read_gguf_tensors(path), gguf_tensors(model)
    for name, tensor in ours.items():
        np.testing.assert_allclose(back[name], tensor.numpy(), atol=float(tensor.abs().max()) * error, err_msg=name)
    if outtype == "q4_0":  # 16 levels: coarser than Q8_0, but no weight moves by more than half a step
        assert max(float(np.abs(back[n] - t.numpy()).max()) for n, t in ours.items()) > 1e-3


def test_llama_qk_permutation_turns_rotate_half_into_interleaved_pairs():
    """llama.cpp rotates adjacent pairs (2i, 2i+1); after the permutation that equals HF's rotate-half RoPE."""
    config = Config.from_name("llama-nano", block_size=16)
    n_head, d = 3, config.hdim
    weight = torch.randn(n_head * d, config.n_embd)
    x = torch.randn(5, config.n_embd)
    cos, sin = rope_cache(config, 5)  # (T, D)
    q_hf = (x @ weight.t()).view(5, n_head, d).transpose(0, 1)  # (H, T, D)
    rotated_hf = apply_rope(q_hf[None], cos[None, None], sin[None, None])[0]
    q_cpp = (x @ permute_for_llama_cpp(weight, n_head).t()).view(5, n_head, d).transpose(0, 1)
    pairs = q_cpp.reshape(n_head, 5, d // 2, 2)
    c, s = cos[:, : d // 2][None], sin[:, : d // 2][None]  # (1, T, D/2)
    rotated_cpp = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    expected = permute_for_llama_cpp(rotated_hf.transpose(0, 1).reshape(5, n_head * d).t(), n_head).t()
    torch.testing.assert_close(rotated_cpp.reshape(n_head, 5, d).transpose(0, 1).reshape(5, -1), expected)


def test_gguf_export_refuses_what_llama_cpp_cannot_run(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="GGUF export supports GPT-2"):
        export_gguf(GPT(Config.from_name("nano", pos_embedding="sinusoidal")), tmp_path / "x.gguf", tokenizer)
    char = Tokenizer.train_char([TEXT])
    with pytest.raises(ValueError, match="byte-level BPE"):
        export_gguf(tiny("gpt2"), tmp_path / "y.gguf", char)
    with pytest.raises(ValueError, match="outtype"):
        export_gguf(tiny("gpt2"), tmp_path / "z.gguf", tokenizer, outtype="q3")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_llama_cpp_greedy_tokens_match(tmp_path, tokenizer, family):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny(family)
    save(tmp_path / "m", model, tokenizer)
    assert main(["export", "--model", str(tmp_path / "m"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    prompt = tokenizer.encode("the quick brown fox")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=2, verbose=False,
                          logits_all=False)
    theirs = []
    llm.eval(prompt)
    for _ in range(10):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(token)
        llm.eval([token])
    ours, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(10):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            ours.append(token)
            ids.append(token)
    assert ours == theirs


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_llama_cpp_binary_greedy_bytes_match(tmp_path, tokenizer, family):
    """llama.cpp's own CLI ($LLAMACPP_BIN/llama-completion) continues an exported model exactly as we do."""
    import os
    import subprocess
    from pathlib import Path

    from gptforge.generate import generate

    binary = Path(os.environ.get("LLAMACPP_BIN", "")) / "llama-completion"
    if not os.environ.get("LLAMACPP_BIN") or not binary.is_file():
        pytest.skip("set LLAMACPP_BIN to a folder with llama.cpp's llama-completion to run this check")
    torch.manual_seed(0)
    # The tokenizer's own vocabulary (no padding ids, which llama.cpp prints as nothing) and 64-wide heads.
    name = "nano" if family == "gpt2" else "llama-nano"
    config = Config.from_name(name, vocab_size=tokenizer.vocab_size, block_size=64, n_embd=128, n_head=2,
                              init_std=0.2, **({"n_kv_head": 1} if family == "llama" else {}))
    model = GPT(config).eval()
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    prompt = "the quick brown fox"
    ours = generate(model, prompt, tokenizer, max_new_tokens=12, eos_token_id=[])[0].token_ids
    table = tokenizer.token_bytes()
    done = subprocess.run([str(binary), "-m", str(path), "-p", prompt, "-n", "12", "--temp", "0", "--ignore-eos",
                           "-no-cnv", "--no-display-prompt", "-t", "1", "--no-warmup", "-c", "64"],
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = b"".join(table[t] for t in ours if t not in tokenizer.special_ids)  # llama.cpp prints no control tokens
    assert done.stdout.rstrip(b"\n") == shown.rstrip(b"\n")
