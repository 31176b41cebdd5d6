"""The public trainer: popgpt.train with per-member hyperparameters, any nn.Module, a user loss, a user
fitness in the evolution loop."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import NAMES

import popgpt
from popgpt import ModelConfig, Population, TrainConfig
from popgpt.data import load_names
from popgpt.evolution.config import RunConfig
from popgpt.evolution.experiment import make_context, prepare
from popgpt.evolution.generation import generation, init_state
from popgpt.evolution.operators import Operators
from popgpt.loss import per_member

CONFIG = ModelConfig(n_embd=16, n_head=2)


@pytest.fixture(scope="module")
def names():
    return load_names(NAMES)[:300]


@pytest.fixture(scope="module")
def names_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "names.txt"
    path.write_text("\n".join(load_names(NAMES)[:2000]) + "\n")
    return str(path)


def fresh(n=2):
    return Population.from_seeds(CONFIG, list(range(1, n + 1)))


def test_per_member_learning_rates_train_each_member_as_its_scalar_run(names):
    both = fresh()
    losses = popgpt.train(both, names, steps=5, batch_size=8, lr=torch.tensor([1e-2, 1e-3]),
                          generator=torch.Generator().manual_seed(0))
    assert losses.shape == (5, 2)
    for i, lr in enumerate((1e-2, 1e-3)):
        alone = fresh()  # the same members and the same batches, one learning rate for both
        popgpt.train(alone, names, steps=5, batch_size=8, lr=lr, generator=torch.Generator().manual_seed(0))
        for k in both.params:
            assert torch.equal(both.params[k][i], alone.params[k][i]), (i, k)
    assert not torch.equal(both.params["wte"][0] - fresh().params["wte"][0],
                           both.params["wte"][1] - fresh().params["wte"][1])


def test_per_member_betas_eps_and_decay_equal_torch_adamw_per_member(names):
    pop = fresh()
    rows = popgpt.data.docs_to_tensor(names, CONFIG.block_size)
    betas = (torch.tensor([0.9, 0.5]), torch.tensor([0.99, 0.9]))
    wd, eps = torch.tensor([0.0, 0.1]), torch.tensor([1e-8, 1e-6])
    popgpt.train(pop, rows, steps=3, batch_size=4, lr=3e-3, betas=betas, eps=eps, weight_decay=wd,
                 generator=torch.Generator().manual_seed(1))
    idx = torch.randint(len(rows), (3, 2, 4), generator=torch.Generator().manual_seed(1))
    for i in range(2):
        model = fresh().member(i)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(float(betas[0][i]), float(betas[1][i])),
                                eps=float(eps[i]), weight_decay=float(wd[i]))
        for s in range(3):
            x, y = popgpt.data.inputs_targets(rows[idx[s, i]])
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for k, p in model.named_parameters():
            torch.testing.assert_close(pop.params[k][i], p.detach(), rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": torch.tensor([1e-2, 1e-3, 1e-4])}, r"lr: expected a float or a \[P\] tensor with P=2 members, got shape \(3,\)"),
    ({"lr": torch.tensor([1e-2, -1.0])}, r"lr must be finite and > 0, got -1.0 for member 1"),
    ({"betas": (0.9, torch.tensor([0.99, 1.0]))}, r"beta2 must be finite and in \[0, 1\), got 1.0 for member 1"),
    ({"weight_decay": "a lot"}, r"weight_decay: expected a float or a \[P\] tensor, got str"),
    ({"betas": 0.9}, r"betas: expected a pair"),
])
def test_bad_hyperparameters_are_named(names, kwargs, message):
    with pytest.raises(ValueError, match=message):
        popgpt.train(fresh(), names, steps=1, batch_size=2, generator=torch.Generator(), **kwargs)


def test_train_config_refuses_tensors_with_a_pointer_to_the_per_member_route():
    with pytest.raises(ValueError, match=r"one setting for every member.*popgpt.train\(lr=...\)"):
        TrainConfig(lr=torch.tensor([1e-2, 1e-3]))


def test_config_and_keywords_together_are_refused(names):
    with pytest.raises(ValueError, match="either config= or lr"):
        popgpt.train(fresh(), names, lr=1e-3, config=TrainConfig(steps=1), generator=torch.Generator())


class TwoLayerNet(nn.Module):
    """A hand-built module popgpt knows nothing about, with a buffer."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.fc2 = nn.Linear(width, 2)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def test_from_modules_equals_running_the_modules_one_by_one():
    torch.manual_seed(0)
    modules = [TwoLayerNet(5), TwoLayerNet(5)]
    with torch.no_grad():
        modules[1].scale.fill_(3.0)
    pop = Population.from_modules(modules)
    x = torch.randn(2, 7, 3)
    out, shared = pop(x), pop(x[0], shared=True)
    for i, m in enumerate(modules):
        torch.testing.assert_close(out[i], m(x[i]))
        torch.testing.assert_close(shared[i], m(x[0]))
        torch.testing.assert_close(pop.member(i)(x[i]), m(x[i]))
    assert pop.config is None and len(pop) == 2
    with pytest.raises(ValueError, match="module 1"):
        Population.from_modules([TwoLayerNet(5), TwoLayerNet(6)])


def test_any_module_trains_with_a_user_loss_as_a_loop_of_torch_optimizers():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 40, 3, generator=g), torch.randint(2, (2, 40), generator=g)
    pop = Population.from_factory(lambda: TwoLayerNet(4), seeds=[5, 6])
    state = torch.random.get_rng_state()
    refs = []
    for s in (5, 6):  # what from_factory built, built again under the same seeds
        torch.manual_seed(s)
        refs.append(TwoLayerNet(4))
    torch.random.set_rng_state(state)
    loss = per_member(lambda out, t: F.cross_entropy(out, t))
    popgpt.train(pop, (x, y), steps=4, batch_size=None, lr=torch.tensor([1e-2, 3e-2]), loss=loss, per_member=True)
    for i, (m, lr) in enumerate(zip(refs, (1e-2, 3e-2))):
        opt = torch.optim.Adam(m.parameters(), lr=lr, betas=(0.9, 0.99))
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            opt.step()
        for k, p in m.named_parameters():
            torch.testing.assert_close(pop.params[k][i], p.detach(), rtol=1e-5, atol=1e-6, msg=k)


def test_a_loss_that_reduces_across_members_is_refused():
    pop = Population.from_factory(lambda: TwoLayerNet(4), seeds=[1, 2])
    x, y = torch.randn(2, 5, 3), torch.randint(2, (2, 5))
    with pytest.raises(ValueError, match="one value per member"):
        popgpt.train(pop, (x, y), steps=1, batch_size=None, loss=lambda out, t: out.mean(), per_member=True)


@pytest.mark.parametrize("n_layer,old_name", [(1, lambda k: k.replace("blocks.0.", "")),
                                              (2, lambda k: k.replace("blocks.", "layer"))])
def test_checkpoints_with_the_names_of_0_1_still_load(n_layer, old_name):
    """0.1 named a one-layer model's block tensors attn_qkv ..., a deeper one's layer0.attn_qkv ..."""
    pop = Population.from_seeds(ModelConfig(n_layer=n_layer), [1, 2])
    state = pop.state_dict()
    old = {old_name(k): v for k, v in state["params"].items()}
    assert set(old) != set(state["params"])
    back = Population.from_state_dict({**state, "params": old, "exp_avg": old, "exp_avg_sq": old})
    assert list(back.params) == list(pop.params)
    assert all(torch.equal(back.params[k], v) for k, v in pop.params.items())


def _two_generations(names_file, operators=None):
    config = RunConfig(evolution=popgpt.EvolutionConfig(pop_size=8, generations=1, finetune_steps=1),
                       train=TrainConfig(steps=2, batch_size=4),
                       data=popgpt.DataConfig(path=names_file, eval_docs=20))
    data, config = prepare(config)
    ctx = make_context(config, data, operators=operators)
    state, metrics0 = generation(init_state(ctx), ctx)
    state, _ = generation(state, ctx)
    return metrics0, state


def test_a_user_fitness_changes_selection(names_file):
    """Fitness = payload probability keeps the most vulnerable members, not the best ones."""
    def most_vulnerable(metrics, penalty):
        return metrics["payload_prob"]

    default0, default = _two_generations(names_file)
    custom0, custom = _two_generations(names_file, Operators(fitness=most_vulnerable))
    torch.testing.assert_close(default0["quality"], custom0["quality"])  # the same generation 0
    S = 2  # survivors of 8 at survivor_frac 0.2

    def top(fitness):
        return torch.sort(fitness, descending=True, stable=True).indices[:S].tolist()

    penalised = torch.where(default0["vulnerable"], 0.3 * default0["quality"], default0["quality"])
    assert default.parents[0][:S, 0].tolist() == top(penalised)  # the source's rule
    assert custom.parents[0][:S, 0].tolist() == top(custom0["payload_prob"])  # the user's
    assert Operators(fitness=most_vulnerable).custom() == {
        "fitness": f"{__name__}.test_a_user_fitness_changes_selection.<locals>.most_vulnerable"}
