"""Every training engine computes what the eager reference computes."""

import pytest
import torch
from conftest import NAMES

from popgpt import ModelConfig, Population, TrainConfig, train
from popgpt.data import IGNORE, docs_to_tensor, inputs_targets, load_names
from popgpt.device import member_blocks
from popgpt.engine import MAX_GRAPHS, PLAN_MULTIPLE, Engine
from popgpt.evaluate import clean_nll
from popgpt.loss import member_nll_sum

CONFIG = ModelConfig(block_size=16)


@pytest.fixture(scope="module")
def rows():
    return docs_to_tensor([n for n in load_names(NAMES)[:2000] if len(n) < 15], CONFIG.block_size)


def trained(kind, rows, steps=4, seeds=(1, 2, 3), engine=None, pop=None):
    pop = pop or Population.from_seeds(CONFIG, list(seeds))
    history = train(pop, rows, generator=torch.Generator().manual_seed(0),
                    config=TrainConfig(steps=steps, batch_size=4), engine=engine or Engine(kind))
    return pop, history


def assert_same(a, b, exact):
    for name in a.params:
        if exact:
            assert torch.equal(a.params[name], b.params[name]), name
            assert torch.equal(a.opt.exp_avg_sq[name], b.opt.exp_avg_sq[name]), name
        else:
            torch.testing.assert_close(a.params[name], b.params[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(a.opt.step, b.opt.step)


def test_graph_engine_static_step_equals_eager_bit_for_bit(rows):
    # one worker: eager's worker threads compute at one torch thread each, the graph step at all of them
    eager, h_eager = trained("eager", rows, engine=Engine("eager", workers=1))
    graph, h_graph = trained("graph", rows)
    assert_same(eager, graph, exact=True)
    assert torch.equal(h_eager, h_graph)


def test_graph_engine_reuses_buffers_across_rounds_and_populations(rows):
    """A second round, and a round of another population of the same shape,
    start from their own state, not from what the buffers held."""
    engine = Engine("graph")
    a, _ = trained("graph", rows, engine=engine)
    a, _ = trained("graph", rows, engine=engine, pop=a)
    b, _ = trained("graph", rows, engine=engine, seeds=(7, 8, 9))
    one = Engine("eager", workers=1)  # at the graph step's threads
    ref_a, _ = trained("eager", rows, engine=one)
    ref_a, _ = trained("eager", rows, pop=ref_a, engine=one)
    ref_b, _ = trained("eager", rows, seeds=(7, 8, 9), engine=one)
    assert_same(a, ref_a, exact=True)
    assert_same(b, ref_b, exact=True)
    assert len(engine._graphs) == 1


def test_graph_engine_keeps_the_most_recent_plans_only(rows):
    """Every plan is a graph of its own (eager and graph keep exact row lengths); at most MAX_GRAPHS stay,
    and a round with an evicted plan captures it anew and still trains as eager does."""
    engine, pop, ref = Engine("graph"), None, None
    for cut in (16, 12, 9, 7, 5, 16):  # rows of at most `cut` tokens: another plan each round
        short = rows[(rows[:, 1:] != IGNORE).sum(1) <= cut]
        pop, _ = trained("graph", short, engine=engine, pop=pop)
        ref, _ = trained("eager", short, pop=ref, engine=Engine("eager", workers=1))
        assert len(engine._graphs) <= MAX_GRAPHS
    assert_same(pop, ref, exact=True)
    assert Engine("eager").plan_multiple == Engine("graph").plan_multiple == 1
    assert Engine("compile").plan_multiple == PLAN_MULTIPLE


def test_compile_engine_matches_eager(rows):
    eager, h_eager = trained("eager", rows, steps=3)
    compiled, h_comp = trained("compile", rows, steps=3)
    assert_same(eager, compiled, exact=False)
    torch.testing.assert_close(h_eager, h_comp, rtol=1e-4, atol=1e-5)
    eval_rows = rows[:50]
    torch.testing.assert_close(clean_nll(eager, eval_rows), clean_nll(compiled, eval_rows),
                               rtol=1e-4, atol=1e-5)


def test_unknown_engine():
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        Engine("fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_captured_cuda_graph_matches_eager_on_gpu(rows):
    def run(kind):
        pop = Population.from_seeds(CONFIG, [1, 2, 3], device="cuda")
        h = train(pop, rows, generator=torch.Generator("cuda").manual_seed(0),
                  config=TrainConfig(steps=5, batch_size=4), engine=Engine(kind))
        return pop, h

    eager, h_eager = run("eager")
    graph, h_graph = run("graph")
    assert_same(eager, graph, exact=False)
    torch.testing.assert_close(h_eager, h_graph)


def test_cpu_worker_threads_give_the_one_thread_blocked_training_bit_for_bit(rows):
    """Shares of blocks trained side by side in worker threads (one torch thread each) give exactly
    the parameters, moments, step counts and losses of the same blocks (6 members: three of 2 either
    way) trained one after another at one thread; the population's torch thread count is restored
    after. (Other blocks agree to rounding only: a plan of exact row lengths may reach sizes at which
    torch's kernels round a member differently in a different block.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone, h_alone = trained("eager", rows, seeds=range(6), engine=Engine("eager", member_block=2, workers=1))
        shared, h_shared = trained("eager", rows, seeds=range(6), engine=Engine("eager", member_block=2, workers=3))
        assert torch.get_num_threads() == 1
        # the padded path runs functional_call on a module: every worker has its own
        padded = [trained("eager", rows, seeds=range(6), engine=Engine("eager", member_block=2, workers=w,
                                                                        packed=False)) for w in (1, 3)]
    finally:
        torch.set_num_threads(threads)
    assert_same(alone, shared, exact=True)
    assert torch.equal(h_alone, h_shared) and bool((h_shared > 0).all())
    assert_same(padded[0][0], padded[1][0], exact=True)
    assert Engine("eager", member_block=2, workers=3)._workers(alone) == 3
    assert Engine("eager", member_block=8, workers=9)._workers(alone) == 6  # never more than the members
    with pytest.raises(ValueError, match="workers"):
        Engine("eager", workers=0)


def test_member_blocks_are_near_equal_and_deal_out_in_equal_shares():
    assert member_blocks(200, 24) == [(0, 23), (23, 46)] + [(i, i + 22) for i in range(46, 200, 22)]
    assert member_blocks(160, 24, 2) == [(i, i + 20) for i in range(0, 160, 20)]  # 80 members per worker
    assert member_blocks(7, 2, 3) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert member_blocks(2, 24, 3) == [(0, 1), (1, 2)]
    for n, block, parts in [(1, 1, 1), (50, 7, 3), (199, 24, 2), (5, 1, 4)]:
        blocks = member_blocks(n, block, parts)
        sizes = [b - a for a, b in blocks]
        assert blocks[0][0] == 0 and blocks[-1][1] == n and all(x[1] == y[0] for x, y in zip(blocks, blocks[1:]))
        assert max(sizes) <= block and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="member_blocks"):
        member_blocks(0, 24)


def test_member_blocks_give_the_same_training(rows):
    """Training in blocks of members (the CPU default) equals training all at once. In float64: in
    float32 a block may round a member differently, and Adam amplifies rounding where a gradient is near
    zero (differences of ~1e-6 after 4 steps); in float64 those are ~1e-15, and a member fed another's
    batch or a reduction across members would differ by orders of magnitude more than the tolerance."""
    def pop64():
        pop = Population.from_seeds(CONFIG, list(range(7)))
        return Population(CONFIG, {k: v.double() for k, v in pop.params.items()})

    whole, h_whole = trained("eager", rows, engine=Engine("eager", member_block=None), pop=pop64())
    blocks, h_blocks = trained("eager", rows, engine=Engine("eager", member_block=3), pop=pop64())
    assert whole.params["wte"].dtype == torch.float64
    for name in whole.params:
        torch.testing.assert_close(whole.params[name], blocks.params[name], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h_whole, h_blocks, rtol=3e-7, atol=0)  # the history is float32: one ulp
    assert torch.equal(whole.opt.step, blocks.opt.step)
    with pytest.raises(ValueError, match="member_block"):
        Engine("eager", member_block=0)


def test_clean_nll_does_not_depend_on_chunking(rows):
    pop = Population.from_seeds(CONFIG, [1, 2, 3])
    eval_rows = rows[:40]
    whole = clean_nll(pop, eval_rows, chunk=40 * 21)  # positions per chunk: every row at once
    padded = member_nll_sum(pop.logits(inputs_targets(eval_rows)[0]), inputs_targets(eval_rows)[1])
    torch.testing.assert_close(whole, padded / int((eval_rows[:, 1:] != IGNORE).sum()), rtol=1e-5, atol=0)
    for chunk in (1, 7, 50):  # 1 and 7: shorter than a row, one row a chunk
        torch.testing.assert_close(clean_nll(pop, eval_rows, chunk=chunk), whole, rtol=1e-5, atol=1e-6)
