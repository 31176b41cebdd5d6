"""On a CUDA device: a generation makes no hidden host syncs, captured graphs train as eager does.

Every test here needs a CUDA device and is skipped without one (CI has none;
the project's GPU runs are in README, Performance).
"""

import dataclasses

import pytest
import torch

from popgpt.engine import Engine
from popgpt.evolution.config import DataConfig, EvolutionConfig, RunConfig, VirusConfig
from popgpt.evolution.experiment import make_context, prepare
from popgpt.evolution.generation import generation, init_state
from popgpt.population import Population
from popgpt.step import Batches, Hyper, TrainConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_config(names, **kw):
    """A tiny run on the GPU: P=6, 4 generations, the trigger mutating every 2."""
    return RunConfig(data=DataConfig(path=names, eval_docs=40), virus=VirusConfig(mutate_every=2),
                     train=TrainConfig(steps=4, batch_size=8), device="cuda", n_sample_names=2,
                     evolution=EvolutionConfig(pop_size=6, generations=4, finetune_steps=2), **kw)


@pytest.mark.parametrize("kind", ["eager", "graph"])
@pytest.mark.parametrize("order", ["source", "before-breeding"])
def test_a_generation_makes_no_hidden_host_sync(names_path, kind, order):
    """Generations 2-4 (breeding, fine-tuning, evaluation, a trigger mutation with re-infection) under
    ``set_sync_debug_mode("error")``: only the one intended read (``device.host_read``) may sync."""
    config = gpu_config(names_path, engine=kind)
    config = dataclasses.replace(config, virus=dataclasses.replace(config.virus, reinfect="on-mutation"),
                                 evolution=dataclasses.replace(config.evolution, mutation_order=order))
    data, config = prepare(config)
    ctx = make_context(config, data, Engine(kind))
    state = init_state(ctx)
    for _ in range(2):  # generation 0 and a first fine-tuning round: graphs captured, kernels loaded
        state, _ = generation(state, ctx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        while state.generation < config.evolution.generations:
            state, host = generation(state, ctx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert state.generation == 4 and state.viruses[0].trigger != "qx"  # the mutation ran under the check
    assert host["quality"].isfinite().all()


def test_the_sync_check_catches_a_sync():
    """The check above can fail: an ``.item()`` inside it raises."""
    x = torch.ones(3, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("kind", ["graph", "compile"])
def test_engines_with_per_member_settings_match_eager_on_gpu(kind):
    """Own learning rates, betas, decay, tables and step masks: a captured graph (and compile) equals eager."""
    from popgpt.model import ModelConfig

    cfg = ModelConfig(block_size=8)
    g = torch.Generator("cuda").manual_seed(0)
    bank = torch.randint(1, 27, (2, 50, 9), generator=g, device="cuda", dtype=torch.long).to(torch.int8)
    table = torch.tensor([0, 1, 1, 0, 1], device="cuda")
    rows = torch.randint(50, (6, 5, 4), generator=g, device="cuda")
    active = torch.arange(6, device="cuda")[:, None] < torch.tensor([6, 3, 6, 1, 4], device="cuda")[None]
    hp = Hyper(*(torch.tensor(v, device="cuda") for v in
                 ([1e-2, 3e-3, 1e-3, 1e-2, 5e-3], [0.9, 0.8, 0.9, 0.5, 0.9], [0.99, 0.999, 0.9, 0.99, 0.95],
                  [1e-8] * 5, [0.0, 0.1, 0.0, 0.01, 0.0])))

    def trained(k):
        pop = Population.from_seeds(cfg, list(range(5)), device="cuda")
        losses = Engine(k).run(pop, Batches(bank, table, rows, active), hp)
        return pop, losses

    ref, ref_losses = trained("eager")
    got, got_losses = trained(kind)
    for name in ref.params:
        torch.testing.assert_close(got.params[name], ref.params[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_losses, ref_losses, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.opt.step, ref.opt.step)


def test_a_gpu_run_reproduces_itself(names_path, tmp_path):
    """Same seed on the same GPU, same generations.csv, byte for byte."""
    from popgpt.evolution.experiment import evolve

    config = gpu_config(names_path, engine="graph")
    for name in ("a", "b"):
        evolve(config, str(tmp_path / name), log=lambda s: None)
    assert (tmp_path / "a" / "generations.csv").read_text() == (tmp_path / "b" / "generations.csv").read_text()
