import pytest
import torch

from popgpt import ModelConfig, Population, TrainConfig
from popgpt.evolution.config import EvolutionConfig
from popgpt.evolution.operators import crossover, mutate, next_generation, select, selection_fitness
from popgpt.step import train_step

CONFIG = ModelConfig()


def population(n):
    return Population.from_seeds(CONFIG, [i * 137 + 42 for i in range(n)])


def test_select_takes_the_fittest_best_first():
    fitness = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert select(fitness, 3).tolist() == [1, 3, 2]


def test_select_ranks_nan_last():
    assert select(torch.tensor([float("nan"), 0.5, 0.3]), 2).tolist() == [1, 2]


def test_selection_fitness_penalises_only_vulnerable():
    q = torch.tensor([0.5, 0.5, 0.4, -0.2, -0.2])
    out = selection_fitness(q, torch.tensor([True, False, False, True, False]), 0.3)
    torch.testing.assert_close(out, torch.tensor([0.15, 0.5, 0.4, -0.34, -0.2]))


def test_crossover_takes_every_tensor_whole_from_one_parent():
    pop = population(6)
    parents = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 4], [3, 3]] * 8)
    children, from_first = crossover(pop.params, parents, 0.5, torch.Generator().manual_seed(0))
    for c in range(len(parents)):
        for j, name in enumerate(pop.params):
            a, b = parents[c].tolist()
            src = a if from_first[c, j] else b
            assert torch.equal(children[name][c], pop.params[name][src])
            # and it is not a mix: unequal to the other parent unless they are the same member
            if a != b:
                other = b if from_first[c, j] else a
                assert not torch.equal(children[name][c], pop.params[name][other])
    frac = from_first.float().mean().item()
    assert 0.35 < frac < 0.65  # 280 coin flips


@pytest.mark.parametrize("rate,std", [(0.01, 0.02), (0.2, 0.5)])
def test_mutation_touches_about_rate_of_weights_with_given_strength(rate, std):
    pop = population(40)
    out = mutate(pop.params, rate, std, torch.Generator().manual_seed(1))
    changed, deltas, total = 0, [], 0
    for name in pop.params:
        d = out[name] - pop.params[name]
        changed += int((d != 0).sum())
        deltas.append(d[d != 0])
        total += d.numel()
    deltas = torch.cat(deltas)
    n = total * rate
    assert abs(changed - n) < 5 * (n * (1 - rate)) ** 0.5  # binomial, 5 sigma
    assert abs(deltas.std().item() - std) < 0.05 * std
    assert abs(deltas.mean().item()) < 5 * std / changed ** 0.5


def test_next_generation_keeps_survivors_bit_for_bit():
    pop = population(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 27, (10, 4, CONFIG.block_size), generator=g)
    train_step(pop, x, x, TrainConfig())  # survivors carry real optimizer state
    fitness = torch.linspace(0, 1, 10)
    cfg = EvolutionConfig(pop_size=10, survivor_frac=0.2)
    survivors, children, parents = next_generation(pop, fitness, cfg, g)
    assert len(survivors) == 2 and len(children) == 8 and parents.shape == (10, 2)
    for k, i in enumerate([9, 8]):
        assert parents[k].tolist() == [i, i]
        for name in pop.params:
            assert torch.equal(survivors.params[name][k], pop.params[name][i])
            assert torch.equal(survivors.opt.exp_avg_sq[name][k], pop.opt.exp_avg_sq[name][i])
        assert survivors.opt.step[k] == 1
    assert set(parents[2:].flatten().tolist()) <= {8, 9}
    assert torch.equal(children.opt.step, torch.zeros(8))
    assert all(v.abs().sum() == 0 for v in children.opt.exp_avg.values())


def test_evolution_config_validation():
    with pytest.raises(ValueError, match="survivor"):
        EvolutionConfig(pop_size=4, survivor_frac=0.1)
    with pytest.raises(ValueError, match="mutation_rate"):
        EvolutionConfig(mutation_rate=1.5)


def test_distinct_parents_never_pair_a_survivor_with_itself():
    from popgpt.evolution.operators import pick_parents

    survivors = torch.tensor([3, 7, 9])
    pairs = pick_parents(survivors, 3000, torch.Generator().manual_seed(0), distinct=True)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    counts = torch.stack([(pairs[:, 1] == s).sum() for s in survivors]).float()
    assert (counts / 3000 - 1 / 3).abs().max() < 0.03  # second parents uniform
    same = pick_parents(survivors, 3000, torch.Generator().manual_seed(0))
    assert (same[:, 0] == same[:, 1]).float().mean() == pytest.approx(1 / 3, abs=0.03)  # the default repeats
