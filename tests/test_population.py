"""The batched path equals a loop of single models."""

import pytest
import torch
import torch.nn.functional as F

from popgpt import MicroGPT, ModelConfig, Population, TrainConfig
from popgpt.data import IGNORE
from popgpt.step import member_losses, train_step

SEEDS = [42, 179, 316, 7]


def single_models(config, seeds):
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(MicroGPT(config))
    return models


def batches(config, n_members, steps, seed=0):
    """Per-member (x, y) batches with padding, like real name batches."""
    g = torch.Generator().manual_seed(seed)
    T = config.block_size
    out = []
    for _ in range(steps):
        x = torch.randint(0, config.vocab_size, (n_members, 5, T), generator=g)
        y = torch.randint(0, config.vocab_size, (n_members, 5, T), generator=g)
        lengths = torch.randint(2, T + 1, (n_members, 5, 1), generator=g)
        y = y.masked_fill(torch.arange(T) >= lengths, IGNORE)
        out.append((x, y))
    return out


def single_loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_from_seeds_equals_models_built_alone(n_layer):
    config = ModelConfig(n_layer=n_layer)
    pop = Population.from_seeds(config, SEEDS)
    for i, model in enumerate(single_models(config, SEEDS)):
        for name, p in model.named_parameters():
            assert torch.equal(pop.params[name][i], p.detach()), name
        assert all(torch.equal(a, b) for a, b in zip(pop.member(i).parameters(), model.parameters()))


@pytest.mark.parametrize("n_layer", [1, 2])
def test_logits_equal_loop(n_layer):
    config = ModelConfig(n_layer=n_layer)
    pop = Population.from_seeds(config, SEEDS)
    models = single_models(config, SEEDS)
    x, _ = batches(config, len(SEEDS), 1)[0]
    per_member = pop.logits(x)  # (P, B, T, V)
    shared = pop.logits(x[0])
    assert per_member.shape == (4, 5, config.block_size, 27)
    for i, model in enumerate(models):
        with torch.no_grad():
            torch.testing.assert_close(per_member[i], model(x[i]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(shared[i], model(x[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_losses_and_gradients_equal_loop(n_layer):
    config = ModelConfig(n_layer=n_layer)
    pop = Population.from_seeds(config, SEEDS)
    models = single_models(config, SEEDS)
    x, y = batches(config, len(SEEDS), 1)[0]
    names = list(pop.params)
    for p in pop.params.values():
        p.requires_grad_(True)
    losses = member_losses(pop, x, y)
    grads = torch.autograd.grad(losses.sum(), [pop.params[k] for k in names])
    for i, model in enumerate(models):
        loss = single_loss(model, x[i], y[i])
        torch.testing.assert_close(losses[i], loss, rtol=1e-5, atol=1e-6)
        single = dict(zip(names, torch.autograd.grad(loss, [model.get_parameter(k) for k in names])))
        for name, g_pop in zip(names, grads):
            torch.testing.assert_close(g_pop[i], single[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("n_layer,steps", [(1, 1), (1, 6), (2, 1), (2, 6)])
def test_adam_steps_equal_torch_optim_loop(n_layer, steps):
    config = ModelConfig(n_layer=n_layer)
    cfg = TrainConfig(lr=1e-2, beta1=0.9, beta2=0.99)
    pop = Population.from_seeds(config, SEEDS)
    models = single_models(config, SEEDS)
    data = batches(config, len(SEEDS), steps)
    for x, y in data:
        train_step(pop, x, y, cfg)
    for i, model in enumerate(models):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        for x, y in data:
            opt.zero_grad()
            single_loss(model, x[i], y[i]).backward()
            opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(pop.params[name][i], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(pop.opt.step, torch.full((4,), float(steps)))


def test_members_train_independently():
    """Changing one member's data leaves every other member's trajectory bit-identical."""
    config = ModelConfig()
    cfg = TrainConfig()
    a, b = Population.from_seeds(config, SEEDS), Population.from_seeds(config, SEEDS)
    data = batches(config, len(SEEDS), 3)
    for x, y in data:
        train_step(a, x, y, cfg)
        x2 = x.clone()
        x2[2] = (x2[2] + 1) % config.vocab_size
        train_step(b, x2, y, cfg)
    for name in a.params:
        assert not torch.equal(a.params[name][2], b.params[name][2])
        for i in (0, 1, 3):
            assert torch.equal(a.params[name][i], b.params[name][i]), name


def test_per_member_step_counts_give_per_member_bias_correction():
    """A fresh member trained next to an old one takes the same step as when trained alone."""
    config = ModelConfig()
    cfg = TrainConfig()
    old = Population.from_seeds(config, SEEDS[:1])
    for x, y in batches(config, 1, 5, seed=3):
        train_step(old, x, y, cfg)
    fresh = Population.from_seeds(config, SEEDS[1:2])
    mixed = Population.cat([old, fresh.clone()])
    x, y = batches(config, 2, 1, seed=9)[0]
    train_step(mixed, x, y, cfg)
    train_step(fresh, x[1:], y[1:], cfg)
    for name in fresh.params:
        torch.testing.assert_close(mixed.params[name][1], fresh.params[name][0], rtol=1e-6, atol=1e-7)
    assert mixed.opt.step.tolist() == [6.0, 1.0]


def test_indexing_carries_parameters_and_optimizer_state():
    config = ModelConfig()
    pop = Population.from_seeds(config, SEEDS)
    x, y = batches(config, 4, 1)[0]
    train_step(pop, x, y, TrainConfig())
    sub = pop[torch.tensor([3, 1])]
    assert len(sub) == 2 and len(pop) == 4
    for name in pop.params:
        assert torch.equal(sub.params[name][0], pop.params[name][3])
        assert torch.equal(sub.opt.exp_avg[name][1], pop.opt.exp_avg[name][1])
        assert torch.equal(sub.opt.exp_avg_sq[name][0], pop.opt.exp_avg_sq[name][3])
    sub.params["wte"][0].zero_()  # a copy, not a view
    assert pop.params["wte"][3].abs().sum() > 0


def test_logits_reject_wrong_member_count():
    pop = Population.from_seeds(ModelConfig(), SEEDS)
    with pytest.raises(ValueError, match="3 members"):
        pop.logits(torch.zeros(3, 2, 5, dtype=torch.long))


def test_state_dict_roundtrip(tmp_path):
    pop = Population.from_seeds(ModelConfig(n_layer=2), SEEDS)
    torch.save(pop.state_dict(), tmp_path / "pop.pt")
    back = Population.from_state_dict(torch.load(tmp_path / "pop.pt", weights_only=True))
    assert back.config == pop.config
    assert all(torch.equal(back.params[k], pop.params[k]) for k in pop.params)


def test_view_shares_storage_and_trains_in_place():
    config = ModelConfig()
    pop = Population.from_seeds(config, SEEDS)
    before = {k: v.clone() for k, v in pop.params.items()}
    part = pop.view(1, 3)
    x, y = batches(config, 2, 1)[0]
    train_step(part, x, y, TrainConfig())
    for name in pop.params:
        assert torch.equal(pop.params[name][[0, 3]], before[name][[0, 3]])
        assert not torch.equal(pop.params[name][1:3], before[name][1:3])
    assert pop.opt.step.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_slicing_copies():
    pop = Population.from_seeds(ModelConfig(), SEEDS)
    part = pop[1:3]
    assert len(part) == 2 and torch.equal(part.params["wte"][0], pop.params["wte"][1])
    part.params["wte"].zero_()
    assert pop.params["wte"][1].abs().sum() > 0


def test_from_seeds_takes_the_device_by_name_only():
    """``from_seeds(config, seeds, "cuda")`` once passed the device as ``n`` and left every member on the
    CPU (found on the first GPU run); the count and the device are keyword-only now."""
    with pytest.raises(TypeError):
        Population.from_seeds(ModelConfig(), SEEDS, "cpu")
    pop = Population.from_seeds(ModelConfig(), SEEDS, device="cpu")
    assert pop.device.type == "cpu" and len(pop) == len(SEEDS)
