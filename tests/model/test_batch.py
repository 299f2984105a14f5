"""Per-call rows: `batch_adapters` keeps each block's rows with the call (a ContextVar; per thread under
torch.compile), so threads never see each other's rows, nothing outlives a block, and an adapter an open block
runs cannot be deleted."""

from __future__ import annotations

import threading

import pytest
import torch

import amole_compile as ac
from amole_compile.model.mixed import open_rows

from mixed_models import adapted, per_row
from models import ids, logits

MIXES = [["a", "b", None, "c"], ["d", None, "a", "a"], ["c", "c", "b", "d"], [None, "d", "c", "b"]]


def _run_threads(fn, n):
    errors, threads = [], []

    def wrap(i):
        try:
            fn(i)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    for i in range(n):
        threads.append(threading.Thread(target=wrap, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_threads_with_different_rows_get_their_own():
    model = adapted()
    x = ids(4, 6, seed=7)
    wants = [per_row(model, x, rows) for rows in MIXES]
    ac.set_active_adapter(model, "a")
    barrier = threading.Barrier(len(MIXES))
    wrong = []

    def worker(i):
        with ac.batch_adapters(model, MIXES[i]):
            for _ in range(5):
                barrier.wait()  # every thread inside its block before any forward
                with torch.no_grad():
                    got = logits(model, x)
                if (got - wants[i]).abs().max() > 1e-5:
                    wrong.append(i)

    _run_threads(worker, len(MIXES))
    assert wrong == [], f"{len(wrong)} of {5 * len(MIXES)} forwards ran another thread's rows"


def test_no_block_outlives_its_exit_in_any_order():
    """A enters, B enters, A exits, B exits: afterwards a plain forward runs the active adapter (the old per-
    module assignment restored A's rows when B exited)."""
    model = adapted()
    x = ids(4, 6, seed=8)
    ac.set_active_adapter(model, "b")
    want = logits(model, x)
    steps = [threading.Event() for _ in range(3)]

    def a(_):
        with ac.batch_adapters(model, MIXES[0]):
            steps[0].set()
            steps[1].wait()
        steps[2].set()

    def b(_):
        steps[0].wait()
        with ac.batch_adapters(model, MIXES[1]):
            steps[1].set()
            steps[2].wait()

    _run_threads(lambda i: (a, b)[i](i), 2)
    assert open_rows() is None and ac.model.state.state_of(model).blocks == []
    assert torch.equal(logits(model, x), want)
    logits(model, ids(3, 6, seed=8))  # another batch size runs (stale rows for 4 would raise)


def test_set_active_adapter_inside_a_block_leaves_the_rows_to_the_block():
    model = adapted()
    x = ids(4, 6, seed=9)
    want = per_row(model, x, MIXES[2])
    with ac.batch_adapters(model, MIXES[2]):
        ac.set_active_adapter(model, "d")
        assert (logits(model, x) - want).abs().max() <= 1e-5
    ac.set_active_adapter(model, "d")
    assert torch.equal(logits(model, x), per_row(model, x, ["d"] * 4))


def test_deleting_an_adapter_an_open_block_runs_raises_naming_the_block():
    model = adapted()
    with ac.batch_adapters(model, ["a", "b", None, "a"]):
        with pytest.raises(ValueError, match=r"'b' is in use by an open batch_adapters block \(rows \['a', 'b'"):
            ac.delete_adapter(model, "b")
        assert "b" in ac.adapter_names(model)
        failed = []

        def other(_):
            try:
                ac.delete_adapter(model, "a")
            except ValueError as exc:
                failed.append(str(exc))

        _run_threads(other, 1)  # another thread sees the block too
        assert failed and "MainThread" in failed[0]
    ac.delete_adapter(model, "b")  # after the block: fine
    assert sorted(ac.adapter_names(model)) == ["a", "c", "d"]


def test_compiled_forwards_in_two_threads_see_their_own_rows():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = adapted(layers=1)  # (the rows are per site; one layer halves the compile)
    x = ids(4, 6, seed=10)
    wants = [per_row(model, x, rows) for rows in MIXES[:2]]
    ac.set_active_adapter(model, "a")
    plain = logits(model, x)
    compiled = torch.compile(model, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True)
    barrier = threading.Barrier(2)
    got = {}

    def worker(i):
        with ac.batch_adapters(model, MIXES[i]), torch.no_grad():
            barrier.wait()
            got[i] = [compiled(input_ids=x).logits for _ in range(2)]

    _run_threads(worker, 2)
    for i in range(2):
        for out in got[i]:
            assert (out - wants[i]).abs().max() <= 1e-5, i
    with torch.no_grad():  # outside every block the compiled model runs the active adapter
        assert (compiled(input_ids=x).logits - plain).abs().max() <= 1e-5


def test_asyncio_tasks_interleaving_blocks_get_their_own_rows():
    """Two tasks in one thread, each inside its block across awaits: the rows are task-local (eager)."""
    import asyncio

    model = adapted()
    x = ids(4, 6, seed=11)
    wants = [per_row(model, x, rows) for rows in MIXES[:2]]
    ac.set_active_adapter(model, "c")
    plain = logits(model, x)

    async def task(i):
        with ac.batch_adapters(model, MIXES[i]):
            out = []
            for _ in range(3):
                await asyncio.sleep(0)  # the other task runs here, inside its own block
                with torch.no_grad():
                    out.append(logits(model, x))
            return out

    async def both():
        return await asyncio.gather(task(0), task(1))

    for i, outs in enumerate(asyncio.run(both())):
        assert all((o - wants[i]).abs().max() <= 1e-5 for o in outs), i
    assert torch.equal(logits(model, x), plain)
