"""Models whose forward runs torch.compile'd code: transformers' flex attention (a compiled block mask and a
compiled `flex_attention`), and a hand-written block calling a `torch.compile(fullgraph=True)` function.

Before: `plan` of a flex-attention Llama crashed the process (a segmentation fault: the recording forward on fake
tensors ran inductor's compiled code, which read their data pointers). Fake forwards now run compiled functions as
plain Python (`torch.compiler.set_stance("force_eager")`, which leaves their caches alone: disabling dynamo
instead made a later real call fail), the capture exports with gradients off and compiled functions eager, and
`flex_attention` (which returns (out, logsumexp, ...)) is an attention anchor.

Flex attention's compiled CPU path gives NaN or wrong values in this torch on some calls, with or without
adapters (a torch issue, not ours), so the outputs are compared with compiled functions run eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

import amole_compile as ac
from amole_compile.model.state import projections

from models import build, ids

CFG = ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0)


def test_flex_attention_llama_is_found_and_keeps_its_outputs():
    flex = build("llama", attn_implementation="flex_attention")
    sdpa = build("llama")
    sdpa.load_state_dict(flex.state_dict())
    x = ids()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        ref = sdpa(input_ids=x).logits
    want = [(t.module, t.roles, t.slices) for t in ac.plan(sdpa, CFG).targets]
    assert [(t.module, t.roles, t.slices) for t in ac.plan(flex, CFG).targets] == want
    ac.transform(flex, CFG)
    assert len(ac.targets(flex)) == len(want) == 8
    # find_rows' forwards run the compiled flex kernel as plain Python: its CPU build's NaNs made o_proj's rows
    # look dependent (a mixed batch then raised)
    assert {h.batch_dim.dim for _, h in projections(flex)} == {0}
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        torch.testing.assert_close(flex(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    with torch.no_grad():  # compiled as the model's own forward does: still runs (values: see the module doc)
        assert flex(input_ids=x).logits.shape == ref.shape


class _CompiledBlock(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # x [B, S, D]
        a = nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), is_causal=True)
        return x + _mix(self.o(a))


@torch.compile(fullgraph=True)  # inductor: compiled code that reads data pointers
def _mix(y):
    return torch.tanh(y) * 2


class _CompiledLM(nn.Module):
    """Its top level branches on values (so it is captured block by block, through the recording forward)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_CompiledBlock() for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x) if x.abs().max() > 0 else x
        return x


def test_a_compiled_function_still_compiles_after_plan():
    """A hand-written block calling an inductor-compiled function goes through plan (its fake forward runs the
    function eagerly) and transform, and the compiled function still runs afterwards. (Run against the old code
    this passes: the regression test is the flex one above, which crashed the process.)"""
    torch.manual_seed(0)
    model = _CompiledLM().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = model(x)
        plan = ac.plan(model, CFG, example_inputs=(x,))
        assert plan.report.blocks and len(plan.targets) == 8
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        ac.transform(model, CFG, example_inputs=(x,))
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
