"""Mixture of experts: routing and dispatch against a per-token reference, the load-balancing loss against
`transformers`, and that the loss trains the router."""

import pytest
import torch

from gptforge import GPT, Config
from gptforge.model import MoE, load_balancing_loss
from hf_families import MOE_CASES, VOCAB, hf_model

MOE = dict(family="mixtral", vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
           pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_expert=4,
           n_expert_per_token=2, intermediate_size=64)


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over experts, top-k, (renormalise), weighted sum of the chosen experts."""
    out = torch.zeros_like(x)
    for i, token in enumerate(x):
        probs = moe.router(token).softmax(-1)
        weights, chosen = probs.topk(moe.top_k)
        if moe.norm_topk:
            weights = weights / weights.sum()
        for w, e in zip(weights, chosen):
            out[i] += w * moe.experts[int(e)](token[None])[0]
    return out


@pytest.mark.parametrize("norm_topk", [True, False])
def test_grouped_and_dense_dispatch_equal_the_per_token_reference(norm_topk):
    model = GPT(Config(**MOE, moe_norm_topk=norm_topk)).eval()
    moe = model.blocks[0].mlp
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        expected = _reference(moe, x.reshape(-1, 32)).reshape(3, 7, 32)
        torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(moe(x[:1, :1]), expected[:1, :1], atol=1e-6, rtol=1e-5)  # one token: _single
        probs = moe.router(x.reshape(-1, 32)).softmax(-1)
        weights, chosen = probs.topk(2)
        if norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        dense = moe._dense(x.reshape(-1, 32), chosen, weights)
        torch.testing.assert_close(dense.reshape(3, 7, 32), expected, atol=1e-6, rtol=1e-5)


def test_one_token_uses_only_its_experts():
    model = GPT(Config(**MOE)).eval()
    moe = model.blocks[0].mlp
    calls = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0])))
    with torch.no_grad():
        moe(torch.randn(1, 1, 32))
    assert len(calls) == 2 and all(rows == 1 for _, rows in calls)  # top-2: two experts, one row each


@pytest.mark.parametrize("case", MOE_CASES)
def test_aux_loss_equals_transformers(case, tmp_path):
    from gptforge.loading import load_model

    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    hf.train(), ours.train()
    ids = torch.randint(0, VOCAB, (2, 17))
    out = hf(ids, output_router_logits=True)
    logits = ours(ids)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    coef = hf.config.router_aux_loss_coef
    assert ours.aux_loss is not None and ours.config.router_aux_loss_coef == coef
    torch.testing.assert_close(ours.aux_loss, coef * out.aux_loss, atol=1e-6, rtol=1e-5)
    ours.eval()
    with torch.no_grad():
        ours(ids)
    assert ours.aux_loss is None  # only training forwards report it
    assert all(m.router_stats is None for m in ours.moe_layers)  # nothing held between steps


def test_aux_loss_balances_a_skewed_router():
    torch.manual_seed(0)
    moe = GPT(Config(**MOE)).blocks[0].mlp.train()
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    x = torch.randn(1, 256, 32) + 2.0 * u  # every token shares direction u ...
    with torch.no_grad():
        moe.router.weight[0] += 2.0 * u  # ... which the router sends to expert 0

    def step() -> tuple[torch.Tensor, float]:
        moe(x)
        probs, chosen = moe.router_stats
        share = torch.bincount(chosen.reshape(-1), minlength=4).max().item() / chosen.shape[0]
        return load_balancing_loss([moe.router_stats], 4), share

    optimizer = torch.optim.SGD([moe.router.weight], lr=1.0)
    first, first_share = step()
    for _ in range(40):
        loss, _ = step()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last, last_share = step()
    assert first_share > 0.9 and last_share < 0.7  # expert 0 no longer takes (almost) every token
    assert last.item() < first.item()  # 1.0 is a perfect balance


def test_moe_config_counts_and_errors():
    from gptforge.errors import ConfigError

    config = Config(**MOE, moe_intermediate_size=32, moe_dense_layers=[1])
    model = GPT(config)
    assert config.num_params() == model.num_params()
    assert isinstance(model.blocks[0].mlp, MoE) and not isinstance(model.blocks[1].mlp, MoE)
    # 6N counts the experts a token uses, not all of them
    assert config.flops_per_token(16) < config.replace(n_expert_per_token=4).flops_per_token(16)
    with pytest.raises(ConfigError, match="n_expert_per_token"):
        Config(**{**MOE, "n_expert_per_token": 5})
    with pytest.raises(ConfigError, match="moe_dense_layers"):
        Config(**MOE, moe_dense_layers=[2])
