"""torch.compile(mode="reduce-overhead") (CUDA graphs) finds nothing of ours that would make it skip or split a
graph, checked on a CPU with inductor's own tests (issue 21, item 3).

On a GPU, inductor records a graph into a CUDA graph unless a node is CUDA-graph-unsafe: an op tagged so, or one
whose output has a data-dependent (unbacked) size, which is what a host sync such as `.item()` or `nonzero`
leaves in a graph; with graph partitioning (torch 2.13's default) such nodes split the graph instead. Nor may the
graph mutate an input that is not static (a parameter, a buffer). On a CPU every node is "cpu" and the device
reason hides the rest, so these tests run the device-independent checks themselves on inductor's post-grad
graphs (`utils.is_cudagraph_unsafe_fx_node`, unbacked symbols) and read each compiled graph's mutated inputs
against its static ones. The negative controls show that the checks see what they look for. On a CPU the op
traces its torch path; the Triton path's graphs (user-defined Triton kernels, which CUDA graphs take) are checked
on a GPU by `benchmarks/gpu_check.py`, which counts inductor's CUDA-graph skips.
"""

from __future__ import annotations

import pytest
import torch
from test_compile import adapted, step_fn
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor import output_code
from torch._inductor.utils import is_cudagraph_unsafe_fx_node
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from amole_compile.model.modules import expert_sets

from models import ids

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def verdicts(monkeypatch) -> dict:
    """What inductor's CUDA-graph checks find in every graph compiled within the test: "unsafe" (per post-grad
    graph, its unsafe nodes), "mutated" (per compiled graph, (is_backward, mutated inputs that are not
    static))."""
    seen = {"unsafe": [], "mutated": []}

    def check(graph: torch.fx.Graph) -> None:
        seen["unsafe"].append([n.format_node() for n in graph.nodes if is_cudagraph_unsafe_fx_node(n)
                               or ((v := n.meta.get("val")) is not None and free_unbacked_symbols(v))])

    post_compile = output_code.CompiledFxGraph.post_compile

    def post(self, *args, **kwargs):
        static = set(self.fx_kwargs.get("static_input_idxs") or ())
        seen["mutated"].append((bool(self.fx_kwargs.get("is_backward")),
                                sorted(i for i in self.mutated_input_idxs if i not in static)))
        return post_compile(self, *args, **kwargs)

    monkeypatch.setattr(output_code.CompiledFxGraph, "post_compile", post)
    with inductor_config.patch(post_grad_custom_post_pass=check, fx_graph_cache=False):
        yield seen


def _train(model, steps: int = 3):
    step = torch.compile(step_fn(model), mode="reduce-overhead", fullgraph=True)
    x = ids(2, 12)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        step(x).backward()
    return counters["stats"]["unique_graphs"] - graphs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_step_is_cuda_graph_safe(arch, verdicts):
    """Forward + loss + aux loss and the backward (an unfused and a fused-QKV architecture): no unsafe node, no
    mutated input, and one graph over three steps (the aux loss's per-step record recompiles nothing)."""
    model = adapted(arch)
    assert _train(model) == 1
    assert [b for b, _ in verdicts["mutated"]] == [False, True]  # the forward and the backward were checked
    assert verdicts["unsafe"] == [[], []]
    assert verdicts["mutated"] == [(False, []), (True, [])]


def test_eval_with_statistics_is_cuda_graph_safe(verdicts):
    """An evaluation forward that counts the expert statistics mutates only the sites' buffers (static)."""
    model = adapted("llama").eval()
    before = [s.stat_tokens.item() for s in expert_sets(model)]
    with torch.no_grad():
        torch.compile(lambda x: model(input_ids=x).logits, mode="reduce-overhead", fullgraph=True)(ids(2, 12))
    assert all(s.stat_tokens.item() == b + 24 for s, b in zip(expert_sets(model), before, strict=True))
    assert verdicts["unsafe"] == [[]]
    assert verdicts["mutated"] == [(False, [])]


def test_checks_see_a_mutated_input(verdicts):
    def bad(x):
        x.add_(1)
        return (x * 2).sum()

    torch.compile(bad, mode="reduce-overhead", fullgraph=True)(torch.randn(4))
    assert verdicts["mutated"] == [(False, [0])]


def test_checks_see_a_data_dependent_size(verdicts):
    def bad(x):
        return x[x > 0].sum()  # nonzero: a host sync on a GPU

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(bad, mode="reduce-overhead", fullgraph=True)(torch.randn(4))
    assert verdicts["unsafe"] and verdicts["unsafe"][0]
