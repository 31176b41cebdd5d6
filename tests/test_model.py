
import pytest
import torch

from popgpt import MicroGPT, ModelConfig


def test_parameter_names_one_layer():
    names = [n for n, _ in MicroGPT(ModelConfig(), generator=torch.Generator()).named_parameters()]
    assert names == ["wte", "wpe", "lm_head", "blocks.0.attn_qkv", "blocks.0.attn_out", "blocks.0.mlp_fc1",
                     "blocks.0.mlp_fc2"]
    assert list(ModelConfig().param_shapes()) == names


def test_parameter_names_two_layers():
    model = MicroGPT(ModelConfig(n_layer=2), generator=torch.Generator())
    names = [n for n, _ in model.named_parameters()]
    assert names == ["wte", "wpe", "lm_head", "blocks.0.attn_qkv", "blocks.0.attn_out",
                     "blocks.0.mlp_fc1", "blocks.0.mlp_fc2", "blocks.1.attn_qkv", "blocks.1.attn_out",
                     "blocks.1.mlp_fc1", "blocks.1.mlp_fc2"]
    assert list(ModelConfig(n_layer=2).param_shapes()) == names


def test_size_and_shapes():
    model = MicroGPT(ModelConfig(), generator=torch.Generator())
    assert sum(p.numel() for p in model.parameters()) == 8712
    logits = model(torch.randint(27, (3, 21), generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (3, 21, 27)


def test_too_long_input_is_rejected():
    model = MicroGPT(ModelConfig(block_size=8), generator=torch.Generator())
    with pytest.raises(ValueError, match="block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_generator_init_equals_global_seed_init():
    torch.manual_seed(179)
    a = MicroGPT(ModelConfig())
    b = MicroGPT(ModelConfig(), generator=torch.Generator().manual_seed(179))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_attention_is_causal():
    model = MicroGPT(ModelConfig(), generator=torch.Generator().manual_seed(0))
    x = torch.randint(1, 27, (2, 10), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] % 26) + 1  # change the future only
    assert torch.allclose(model(x)[:, :6], model(y)[:, :6], atol=1e-6)
    assert not torch.allclose(model(x)[:, 6:], model(y)[:, 6:])


def test_cache_names_and_pattern_rows_sum_to_one():
    model = MicroGPT(ModelConfig(n_layer=2), generator=torch.Generator().manual_seed(0))
    logits, cache = model(torch.zeros(1, 5, dtype=torch.long), return_cache=True)
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (1, 4, 5, 5)
    assert torch.allclose(pattern.sum(-1), torch.ones(1, 4, 5))
    assert torch.allclose(torch.triu(pattern[0, 0], diagonal=1), torch.zeros(5, 5))
    assert set(cache) >= {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"}


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_embd=25, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(n_layer=0)


def test_without_norm_and_mlp_the_forward_is_attention_only_by_hand():
    """norm=False drops every RMSNorm, mlp=False the MLP (and its tensors): checked against a hand forward."""
    from popgpt.model import causal_attention, hook_names

    cfg = ModelConfig(n_layer=2, norm=False, mlp=False)
    model = MicroGPT(cfg, generator=torch.Generator().manual_seed(0))
    assert [n for n, _ in model.named_parameters()] == ["wte", "wpe", "lm_head", "blocks.0.attn_qkv",
                                                        "blocks.0.attn_out", "blocks.1.attn_qkv", "blocks.1.attn_out"]
    idx = torch.randint(27, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.wte[idx] + model.wpe[:9]
        for block in model.blocks:
            x = x + causal_attention(x, block.attn_qkv, block.attn_out, cfg.n_head)
        expected = x @ model.lm_head.T
        logits, cache = model(idx, return_cache=True)
    torch.testing.assert_close(logits, expected)
    assert list(cache) == hook_names(cfg) and not any("mlp" in k or "normalized" in k for k in cache)


def test_the_step_module_and_the_train_function_do_not_shadow_each_other():
    import popgpt
    import popgpt.step as step_module

    assert callable(popgpt.train) and popgpt.train.__module__ == "popgpt.trainer"
    assert hasattr(step_module, "adam_step") and hasattr(step_module, "Batches")


def test_sample_is_seeded_stops_at_the_boundary_and_keeps_the_prompt():
    model = MicroGPT(ModelConfig(), generator=torch.Generator().manual_seed(0))
    a = model.sample(8, prompt="em", generator=torch.Generator().manual_seed(3))
    b = model.sample(8, prompt="em", generator=torch.Generator().manual_seed(3))
    assert a == b and all(n.startswith("em") and n.isalpha() for n in a)
    assert a != model.sample(8, prompt="em", generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # a model that always ends the name: nothing after the prompt
        for name, p in model.named_parameters():
            p.fill_(1.0 if name == "wte" else 0.0)  # every position's residual is all ones
        model.lm_head[0].fill_(100.0)
    assert model.sample(3, prompt="ann", generator=torch.Generator().manual_seed(0)) == ["ann"] * 3
    assert "parameters=" in repr(model) and "n_embd=24" in repr(model)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=0)


def test_saved_generation_gives_members(make_tiny_run):
    from popgpt.evolution.runs import open_run

    saved = open_run(make_tiny_run(generations=0)).load(0)
    model = saved.member(1)
    assert len(saved) == 8 and isinstance(model, MicroGPT)
    assert torch.equal(model.wte, saved.population.member(1).wte) and len(model.sample(2)) == 2
