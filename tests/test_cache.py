"""The batched cache and interventions against single models, hand-built models and identities."""

import math

import pytest
import torch

from popgpt import MicroGPT, ModelConfig, Population
from popgpt.lens.cache import (
    Edit,
    ablate_heads,
    ablate_neurons,
    activation_means,
    hooked_transformer_config,
    hooked_transformer_state_dict,
    patch,
    run_with_cache,
    to_hooked_transformer,
)
from popgpt.lens.patching import ablation_sweep, logit_diff, mean_nll, patch_sweep
from popgpt.model import hook_names

CFG2 = ModelConfig(n_layer=2, block_size=12)
G = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, 27, (3, 12), generator=G)
OTHER = torch.randint(0, 27, (3, 12), generator=G)


@pytest.fixture(scope="module")
def pop():
    return Population.from_seeds(CFG2, [3, 4, 5])


def test_every_activation_equals_the_member_run_alone(pop):
    names = hook_names(CFG2)
    logits, cache = run_with_cache(pop, TOKENS, names)
    assert set(cache) == set(names) and len(names) == 2 + 2 * 15 + 1
    assert cache["blocks.1.attn.hook_z"].shape == (3, 3, 12, 4, 6)
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, 3, 4, 12, 12)
    assert cache["blocks.1.mlp.hook_post"].shape == (3, 3, 12, 96)
    for i in range(3):
        ref_logits, ref = pop.member(i)(TOKENS, return_cache=True)
        torch.testing.assert_close(logits[i], ref_logits, rtol=1e-5, atol=1e-6)
        for n in names:
            torch.testing.assert_close(cache[n][i], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_only_the_names_asked_for_are_kept_and_unknown_names_fail(pop):
    _, cache = run_with_cache(pop, TOKENS, ["blocks.1.attn.hook_pattern"])
    assert list(cache) == ["blocks.1.attn.hook_pattern"]
    with pytest.raises(ValueError, match="blocks.2.attn.hook_z"):
        run_with_cache(pop, TOKENS, ["blocks.2.attn.hook_z"])
    with pytest.raises(ValueError, match="population axis"):
        run_with_cache(pop, TOKENS, edits=[Edit("hook_embed", torch.ones(2, 1, 1, 1, dtype=torch.bool),
                                                torch.zeros(2, 1, 1, 1))])


def test_per_member_tokens_equal_each_member_on_its_own(pop):
    own = torch.stack([TOKENS, OTHER, TOKENS.flip(0)])  # (P, B, T)
    logits, cache = run_with_cache(pop, own, ["blocks.0.hook_resid_post"])
    for i in range(3):
        ref_logits, ref = pop.member(i)(own[i], return_cache=True)
        torch.testing.assert_close(logits[i], ref_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache["blocks.0.hook_resid_post"][i], ref["blocks.0.hook_resid_post"])


def test_ablating_a_head_of_member_0_leaves_every_other_member_bit_identical(pop):
    clean, _ = run_with_cache(pop, TOKENS)
    heads = torch.zeros(3, 2, 4, dtype=torch.bool)
    heads[0, 1, 2] = True
    ablated, _ = run_with_cache(pop, TOKENS, edits=ablate_heads(pop, heads))
    assert torch.equal(ablated[1:], clean[1:])
    assert not torch.allclose(ablated[0], clean[0])
    # zero ablation of a head = that head's slice of attn_out set to zero
    model = pop.member(0)
    with torch.no_grad():
        model.blocks[1].attn_out[:, 12:18] = 0.0
        torch.testing.assert_close(ablated[0], model(TOKENS), rtol=1e-5, atol=1e-6)


def test_neuron_ablation_equals_zeroing_the_neuron_input_row(pop):
    neurons = torch.zeros(3, 2, 96, dtype=torch.bool)
    neurons[2, 0, [5, 40]] = True
    neurons[1, 1, 7] = True
    logits, _ = run_with_cache(pop, TOKENS, edits=ablate_neurons(pop, neurons))
    clean, _ = run_with_cache(pop, TOKENS)
    assert torch.equal(logits[0], clean[0])
    for i, layer, rows in ((2, 0, [5, 40]), (1, 1, [7])):
        model = pop.member(i)
        with torch.no_grad():
            model.blocks[layer].mlp_fc1[rows] = 0.0  # ReLU(0) = 0: the neuron is silent
            torch.testing.assert_close(logits[i], model(TOKENS), rtol=1e-5, atol=1e-6)


def test_mean_ablation_equals_a_single_model_with_the_mean_written_in(pop):
    ref = torch.randint(0, 27, (16, 12), generator=torch.Generator().manual_seed(7))
    means = activation_means(pop, ref, ["blocks.0.attn.hook_z"])
    heads = torch.zeros(3, 2, 4, dtype=torch.bool)
    heads[:, 0, 1] = True
    logits, _ = run_with_cache(pop, TOKENS, edits=ablate_heads(pop, heads, "mean", means))
    for i in range(3):
        model = pop.member(i)
        _, c = model(ref, return_cache=True)
        mean_z = c["blocks.0.attn.hook_z"].mean(0)  # (T, H, D)

        def edit(name, a):
            if name == "blocks.0.attn.hook_z":
                a = a.clone()
                a[:, :, 1] = mean_z[:, 1]
            return a

        torch.testing.assert_close(logits[i], model(TOKENS, edit=edit), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation_means"):
        ablate_heads(pop, heads, "mean")
    with pytest.raises(ValueError, match="mode"):
        ablate_heads(pop, heads, "resample")


def test_patching_with_itself_changes_nothing(pop):
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern",
             "blocks.0.mlp.hook_post"]
    clean, cache = run_with_cache(pop, TOKENS, names)
    edits = [patch(names[0], cache[names[0]], positions=[3, 4], heads=[1]), patch(names[1], cache[names[1]]),
             patch(names[2], cache[names[2]], heads=[0, 3]), patch(names[3], cache[names[3]], positions=[0])]
    patched, _ = run_with_cache(pop, TOKENS, edits=edits)
    assert torch.equal(patched, clean)


def test_patching_the_whole_input_residual_gives_the_source_run(pop):
    source_logits, source = run_with_cache(pop, OTHER, ["blocks.0.hook_resid_pre"])
    whole = patch("blocks.0.hook_resid_pre", source["blocks.0.hook_resid_pre"])
    patched, _ = run_with_cache(pop, TOKENS, edits=[whole])
    torch.testing.assert_close(patched, source_logits)
    partial, _ = run_with_cache(pop, TOKENS, edits=[patch("blocks.0.hook_resid_pre", source["blocks.0.hook_resid_pre"],
                                                          positions=range(6, 12))])
    clean, _ = run_with_cache(pop, TOKENS)
    torch.testing.assert_close(partial[:, :, :6], clean[:, :, :6])  # causal: earlier positions untouched


def hand_built(w=2.0):
    """One layer; the residual is c(token) e0 + e2; head 0 attends uniformly, reads dim 0 and writes w * z
    into dim 1; lm_head reads dim 1 into logit 1. Nothing else is non-zero."""
    cfg = ModelConfig(block_size=8)
    pop = Population.from_seeds(cfg, [0, 1])
    C = cfg.n_embd
    with torch.no_grad():
        for v in pop.params.values():
            v[0] = 0.0
        pop.params["wte"][0, :, 0] = torch.arange(27.0)
        pop.params["wte"][0, :, 2] = 1.0
        pop.params["blocks.0.attn_qkv"][0, 2 * C + 0, 0] = 1.0  # head 0's value dim 0 <- residual dim 0
        pop.params["blocks.0.attn_out"][0, 1, 0] = w  # residual dim 1 <- head 0's z dim 0
        pop.params["lm_head"][0, 1, 1] = 1.0
    return pop, cfg


def _by_hand(tokens, w, eps, C=24):
    normed = [c / math.sqrt((c * c + 1) / C + eps) for c in tokens]  # rmsnorm of c e0 + e2, dim 0
    z = sum(normed) / len(normed)  # uniform causal attention at the last position
    last = tokens[-1]
    return z, w * z / math.sqrt((last * last + 1 + (w * z) ** 2) / C + eps)


def test_a_patch_in_a_hand_built_model_moves_the_metric_by_the_hand_computed_amount():
    w = 2.0
    pop, cfg = hand_built(w)
    clean, corrupt = [3, 1, 4, 1, 5], [9, 2, 6, 5, 5]
    _, cache = run_with_cache(pop, torch.tensor([corrupt]), ["blocks.0.attn.hook_z"])
    metric = logit_diff(1, 2, -1)
    base = metric(run_with_cache(pop, torch.tensor([clean]))[0])
    z_clean, m_clean = _by_hand(clean, w, cfg.norm_eps)
    z_corrupt, _ = _by_hand(corrupt, w, cfg.norm_eps)
    assert base[0].item() == pytest.approx(m_clean, rel=1e-5)
    edit = patch("blocks.0.attn.hook_z", cache["blocks.0.attn.hook_z"], positions=[4], heads=[0])
    moved = metric(run_with_cache(pop, torch.tensor([clean]), edits=[edit])[0])
    resid = (clean[-1] ** 2 + 1 + (w * z_corrupt) ** 2) / 24 + cfg.norm_eps
    assert (moved - base)[0].item() == pytest.approx(w * z_corrupt / math.sqrt(resid) - m_clean, rel=1e-5)
    assert abs((moved - base)[0].item()) > 0.1
    table = patch_sweep(pop, torch.tensor([clean]), cache, metric, "attn.hook_z", "heads")
    assert table[0, 0, 0].item() == pytest.approx((moved - base)[0].item(), rel=1e-5)
    assert table[0, 0, 1:].abs().max().item() == 0.0  # heads 1-3 write nothing


def _loop_patch_sweep(pop, tokens, source_tokens, metric_of, hook, over):
    """The sweep with single models, one edit function at a time."""
    cfg, P = pop.config, len(pop)
    n = cfg.n_head if over == "heads" else tokens.shape[-1]
    out = torch.zeros(P, cfg.n_layer, n)
    for i in range(P):
        model = pop.member(i)
        _, src = model(source_tokens, return_cache=True)
        base = metric_of(model(tokens)[None])
        for layer in range(cfg.n_layer):
            name = f"blocks.{layer}.{hook}"
            for j in range(n):
                def edit(nm, a, name=name, j=j):
                    if nm != name:
                        return a
                    a = a.clone()
                    if over == "heads":
                        a[:, :, j] = src[name][:, :, j]
                    else:
                        a[:, j] = src[name][:, j]
                    return a
                out[i, layer, j] = (metric_of(model(tokens, edit=edit)[None]) - base)[0]
    return out


@pytest.mark.parametrize("hook,over", [("attn.hook_z", "heads"), ("hook_resid_pre", "positions")])
def test_patch_sweep_equals_a_loop_of_single_models(pop, hook, over):
    _, source = run_with_cache(pop, OTHER, [f"blocks.{i}.{hook}" for i in range(2)])
    y = torch.roll(TOKENS, -1, 1)
    table = patch_sweep(pop, TOKENS, source, mean_nll(y), hook, over)
    ref = _loop_patch_sweep(pop, TOKENS, OTHER, mean_nll(y), hook, over)
    assert table.shape == ((3, 2, 4) if over == "heads" else (3, 2, 12))
    torch.testing.assert_close(table, ref, rtol=1e-4, atol=1e-5)
    assert table.abs().max() > 1e-3


def test_ablation_sweep_equals_a_loop_of_single_models(pop):
    y = torch.roll(TOKENS, -1, 1)
    table = ablation_sweep(pop, TOKENS, mean_nll(y))
    for i in range(3):
        model = pop.member(i)
        base = mean_nll(y)(model(TOKENS)[None])
        for layer in range(2):
            for h in range(4):
                mask = torch.ones(2, 4)
                mask[layer, h] = 0.0
                ref = mean_nll(y)(model(TOKENS, head_mask=mask)[None]) - base
                assert table[i, layer, h].item() == pytest.approx(ref.item(), abs=1e-5)
    with pytest.raises(ValueError, match="positions"):
        patch_sweep(pop, TOKENS, {}, mean_nll(y), "hook_resid_pre", "heads")
    with pytest.raises(ValueError, match="lacks"):
        patch_sweep(pop, TOKENS, {}, mean_nll(y), "attn.hook_z", "heads")


def _hooked_transformer_equations(sd, cfg, tokens):
    """TransformerLens's forward written out from its weights (RMSPre, standard positions, ReLU)."""
    def norm(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg["eps"])

    T = tokens.shape[1]
    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["n_layers"]):
        p = f"blocks.{i}."
        h = norm(x)
        q, k, v = (torch.einsum("btc,hcd->bthd", h, sd[p + f"attn.W_{n}"]) + sd[p + f"attn.b_{n}"] for n in "QKV")
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg["d_head"])
        pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        x = x + torch.einsum("bqhd,hdc->bqc", z, sd[p + "attn.W_O"]) + sd[p + "attn.b_O"]
        hidden = torch.relu(norm(x) @ sd[p + "mlp.W_in"] + sd[p + "mlp.b_in"])
        x = x + hidden @ sd[p + "mlp.W_out"] + sd[p + "mlp.b_out"]
    return norm(x) @ sd["unembed.W_U"] + sd["unembed.b_U"]


def test_exported_weights_in_transformer_lens_layout_give_the_same_logits(pop):
    model = pop.member(1)
    sd = hooked_transformer_state_dict(model)
    cfg = hooked_transformer_config(CFG2)
    assert sd["blocks.1.attn.W_Q"].shape == (4, 24, 6) and sd["blocks.0.attn.W_O"].shape == (4, 6, 24)
    with torch.no_grad():
        torch.testing.assert_close(_hooked_transformer_equations(sd, cfg, TOKENS), model(TOKENS),
                                   rtol=1e-5, atol=1e-5)


def test_hooked_transformer_matches_an_exported_member(pop):
    pytest.importorskip("transformer_lens")
    model = pop.member(2)
    hooked = to_hooked_transformer(model)
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(TOKENS)
        torch.testing.assert_close(logits, model(TOKENS), rtol=1e-4, atol=1e-4)
        _, ours = run_with_cache(pop, TOKENS, ["blocks.1.attn.hook_pattern"])
        torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"], ours["blocks.1.attn.hook_pattern"][2],
                                   rtol=1e-4, atol=1e-5)


def test_a_missing_or_broken_transformer_lens_names_the_real_import_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kw):
        if name == "transformer_lens":
            raise ImportError("cannot import name 'HookedTransformer' from 'transformer_lens'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ImportError, match=r"2\.x or 3\.x.*cannot import name 'HookedTransformer'"):
        to_hooked_transformer(MicroGPT(ModelConfig()))
