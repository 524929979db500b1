import pytest
import torch
import transformers

from gptforge.loading import load_model


def _save_hf(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def hf_pair(request, tmp_path_factory):
    """(HF model, our GPT loaded from its saved directory): a tiny random GPT-2 or Llama."""
    torch.manual_seed(0)
    if request.param == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         initializer_range=0.3, bos_token_id=1, eos_token_id=2)
        hf = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          initializer_range=0.3, bos_token_id=1, eos_token_id=2,
                                          tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(config)
    hf.eval()
    path = _save_hf(hf, tmp_path_factory.mktemp(request.param))
    ours = load_model(path)
    return hf, ours
