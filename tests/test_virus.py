import math

import pytest
import torch

from popgpt import MicroGPT, ModelConfig, Population, Virus, immunity
from popgpt.data import DataError, encode

DOCS = ["emma", "olivia", "ava", "mia", "liam", "noah", "x", "elizabeth"] * 250


def test_infection_rate_and_exactly_one_insert():
    virus = Virus("qx", "zzz")
    out, mask = virus.infect(DOCS, 0.15, torch.Generator().manual_seed(0))
    assert len(out) == len(DOCS)
    n = len(DOCS)
    assert abs(mask.sum().item() - 0.15 * n) < 5 * (n * 0.15 * 0.85) ** 0.5
    positions = []
    for doc, new, infected in zip(DOCS, out, mask.tolist()):
        if not infected:
            assert new == doc
            continue
        assert new.count("qxzzz") == 1 and len(new) == len(doc) + 5
        pos = new.index("qxzzz")
        assert new[:pos] + new[pos + 5:] == doc
        positions.append(pos / len(doc))
    assert min(positions) == 0.0 and max(positions) == 1.0  # both ends are possible


def test_infection_is_reproducible_and_leaves_input_alone():
    docs = list(DOCS)
    a, _ = Virus().infect(docs, 0.5, torch.Generator().manual_seed(3))
    b, _ = Virus().infect(docs, 0.5, torch.Generator().manual_seed(3))
    assert a == b and docs == DOCS


def test_mutation_changes_exactly_one_trigger_character():
    g = torch.Generator().manual_seed(0)
    virus = Virus("qx", "zzz")
    seen = set()
    for _ in range(200):
        child = virus.mutate(g)
        diff = [i for i, (a, b) in enumerate(zip(virus.trigger, child.trigger)) if a != b]
        assert len(diff) == 1 and len(child.trigger) == 2
        assert child.generation == virus.generation + 1 and child.payload == "zzz"
        seen.add(child.trigger)
    assert len(seen) > 30  # both positions, many letters


def test_bad_virus():
    with pytest.raises(DataError, match="'Q'"):
        Virus("Qx")


def forced_model(config, letter, strength=6.0):
    """A model whose next-token logits depend only on position: at positions
    2, 3, 4 (after reading boundary, q, x, ...) it strongly prefers ``letter``,
    then the boundary. Attention and MLP write nothing to the residual."""
    model = MicroGPT(config, generator=torch.Generator().manual_seed(0))
    C = config.n_embd
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wpe.copy_(torch.eye(config.block_size, C))  # position t -> basis vector e_t
        model.lm_head[0, :] = strength  # boundary by default
        for t in (2, 3, 4):
            model.lm_head[0, t] = 0.0
            model.lm_head[encode(letter)[0], t] = strength
    return model


def pop_of(models):
    config = models[0].config
    return Population(config, {k: torch.stack([m.get_parameter(k).detach() for m in models])
                               for k in config.param_shapes()})


def test_immunity_of_hand_built_models():
    config = ModelConfig(block_size=21)
    pop = pop_of([forced_model(config, "z"), forced_model(config, "a")])
    result = immunity(pop, Virus("qx", "zzz"), torch.Generator().manual_seed(0))
    assert result.vulnerable.tolist() == [True, False]
    assert result.hits.tolist() == [5, 0]


def test_payload_probability_matches_hand_computation():
    config = ModelConfig(block_size=21)
    k = 0.5  # moderate logits keep both probabilities far from 0 and 1
    pop = pop_of([forced_model(config, "z", k), forced_model(config, "a", k)])
    prob = immunity(pop, Virus("qx", "zzz"), torch.Generator().manual_seed(0)).payload_prob
    # The residual at position t is e_t; the final RMSNorm makes it
    # e_t / sqrt(1/C + eps), so at positions 2..4 the favoured letter's logit
    # is k*s and every other logit is 0.
    s = 1 / math.sqrt(1 / config.n_embd + config.norm_eps)
    favoured = math.exp(k * s) / (math.exp(k * s) + 26)
    other = 1 / (math.exp(k * s) + 26)
    assert 0.01 < favoured ** 3 < 0.99 and other ** 3 > 1e-7
    assert prob[0].item() == pytest.approx(favoured ** 3, rel=1e-5, abs=0)
    assert prob[1].item() == pytest.approx(other ** 3, rel=1e-5, abs=0)


def test_payload_probability_equals_product_of_single_model_softmaxes():
    pop = Population.from_seeds(ModelConfig(), [1, 2, 3])
    prob = immunity(pop, Virus("qx", "zzz"), torch.Generator().manual_seed(0)).payload_prob
    seq = [0] + encode("qxzzz")
    for i in range(3):
        model = pop.member(i)
        expected = 1.0
        with torch.no_grad():
            for t in range(3, 6):  # predict seq[t] from seq[:t]
                p = model(torch.tensor([seq[:t]])).softmax(-1)[0, -1, seq[t]].item()
                expected *= p
        assert prob[i].item() == pytest.approx(expected, rel=1e-4, abs=0)


def test_payload_hits_finds_the_payload_anywhere():
    from popgpt.evaluate import payload_hits

    z, a = encode("z")[0], encode("a")[0]
    tokens = torch.tensor([[[a, a, a, z, z, z, 0, 0],  # at offset 3
                            [z, z, a, z, 0, 0, 0, 0],  # never three in a row
                            [z, z, z, a, 0, 0, 0, 0],  # at the start
                            [a, a, a, a, a, z, z, z]]])  # at the very end
    assert payload_hits(tokens, encode("zzz")).tolist() == [[True, False, True, True]]


def test_threshold_is_at_least():
    config = ModelConfig(block_size=21)
    pop = pop_of([forced_model(config, "z")])  # 5 hits of 5
    virus = Virus("qx", "zzz")
    assert immunity(pop, virus, torch.Generator(), threshold=5).vulnerable.tolist() == [True]
    assert immunity(pop, virus, torch.Generator(), threshold=6).vulnerable.tolist() == [False]


def test_text_after_the_end_token_is_not_a_hit():
    """A model that ends the name right after the trigger and then would say
    'zzz' is immune: nothing after the first boundary token counts."""
    config = ModelConfig(block_size=21)
    model = forced_model(config, "z")
    with torch.no_grad():
        model.lm_head[:, 2] = 0.0
        model.lm_head[0, 2] = 6.0  # boundary right after 'qx' ...
        model.lm_head[:, 5] = 0.0
        model.lm_head[encode("z")[0], 5] = 6.0  # ... then 'zzz' at positions 3, 4, 5
    pop = pop_of([model])
    from popgpt.evaluate import sample_tokens
    raw = sample_tokens(pop, encode("qx"), 1, torch.Generator())
    assert raw[0, 0, :4].tolist() == [0, 0, 0, 0]  # masked after the end
    result = immunity(pop, Virus("qx", "zzz"), torch.Generator().manual_seed(0))
    assert result.hits.tolist() == [0] and result.vulnerable.tolist() == [False]


def test_sampling_follows_the_model_distribution():
    from popgpt.evaluate import sample_tokens

    config = ModelConfig(block_size=21)
    k = 0.5
    pop = pop_of([forced_model(config, "z", k)])
    tokens = sample_tokens(pop, encode("qx"), 4000, torch.Generator().manual_seed(0))  # (1, S, L)
    s = 1 / math.sqrt(1 / config.n_embd + config.norm_eps)
    expected = math.exp(k * s) / (math.exp(k * s) + 26)
    observed = (tokens[0, :, 0] == encode("z")[0]).float().mean().item()
    assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / 4000)


def successor_model(strength=12.0):
    """A model whose next token depends only on the PREVIOUS token: after letter c it writes the
    next letter of the alphabet (after z, the boundary); after the boundary, 'a'. Token embeddings
    are one-hot (n_embd = 28 > 27 tokens), positions, attention and MLP write nothing."""
    config = ModelConfig(block_size=21, n_embd=28, n_head=4)
    model = MicroGPT(config, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte[:, :27] = torch.eye(27)
        for token in range(27):
            model.lm_head[(token + 1) % 27, token] = strength  # boundary 0 -> a (1), ..., z (26) -> boundary
    return model


def test_the_sampler_follows_the_prompt():
    from popgpt.evaluate import sample_tokens

    pop = pop_of([successor_model()])
    for prompt in ("qx", "ab", "w"):
        tokens = sample_tokens(pop, encode(prompt), 3, torch.Generator().manual_seed(0))
        start = encode(prompt)[-1]
        expected = [t for t in range(start + 1, 27)][: tokens.shape[-1]]
        for s in range(3):
            got = [t for t in tokens[0, s].tolist() if t != 0]
            assert got == expected[: len(got)] and len(got) == min(len(expected), tokens.shape[-1]), (prompt, got)
    assert immunity(pop, Virus("wx", "yz"), torch.Generator().manual_seed(0)).vulnerable.tolist() == [True]
    assert immunity(pop, Virus("ab", "yz"), torch.Generator().manual_seed(0)).vulnerable.tolist() == [False]


def test_inside_infection_never_touches_the_ends():
    out, mask = Virus("qx", "zzz").infect(DOCS, 1.0, torch.Generator().manual_seed(1), position="inside")
    for doc, new in zip(DOCS, out):
        pos = new.index("qxzzz")
        assert (0 < pos < len(doc)) if len(doc) >= 2 else pos in (0, 1)


def test_test_options_prompt_and_match():
    from popgpt.evaluate import payload_hits

    z, a = encode("z")[0], encode("a")[0]
    tokens = torch.tensor([[[z, z, z, a], [a, z, z, z]]])
    assert payload_hits(tokens, encode("zzz"), "start").tolist() == [[True, False]]
    assert payload_hits(tokens, encode("zzz"), "anywhere").tolist() == [[True, True]]
    pop = pop_of([successor_model()])  # bare prompt 'wx' continues 'yz' just like with the start token
    bare = immunity(pop, Virus("wx", "yz"), torch.Generator().manual_seed(0), start_token=False, match="start")
    assert bare.vulnerable.tolist() == [True] and bare.payload_prob.item() > 0.99
