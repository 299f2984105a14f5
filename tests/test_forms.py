"""One site, every form it runs in: for each method of the method table, the same `ExpertSet` (same weights, fp32,
dropout off, inputs without routing ties) through the op's torch path, the Triton kernels (Triton's interpreter
on CPU), a mixed batch (alone in its stack, and in a stack with larger adapters of every method: padded, routed
with per-row constants) and ONNX (the op's translation, run by onnxruntime). The output, the routing scores and
the expert mask of every form equal the torch path's. Each form's arguments come from the builder
(`ExpertSet.op_args` / `ExpertSet.weights`).

Legend: T tokens, D in_features, O out_features (`OUT`), E experts, R rank.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import amole_compile as ac
from amole_compile.kernels import METHODS, adapter, triton_usable
from amole_compile.kernels.mixed_torch import mixed_adapter, stack_sites
from amole_compile.model.modules import ExpertSet

T, D, OUT = 16, 12, 10
SIZES = {"adamole": (4, 2, None), "mole": (3, 3, 2), "lora": (1, 4, None)}  # method -> (E, R, top_k)
OTHER_SIZES = {"adamole": (5, 1, None), "mole": (4, 2, 3), "lora": (1, 2, None)}  # a stack's other adapters:
# more experts, other ranks and a larger top_k, so the site's slot is padded and its constants are per row
MARGIN = 1e-3  # routing decisions at least this far from a tie (forms differ by ~1e-7 in the scores)
RTOL, ATOL = 1e-6, 1e-5  # fp32: the forms agree to ~2e-6 on outputs of magnitude ~10 (a 1e-5 change in scale fails)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton form runs
Forms = dict[str, tuple[Tensor, Tensor, Tensor]]  # form -> (out [T, O], scores [T, E], mask [T, E])


def make_site(method: str, seed: int, sizes: dict = SIZES) -> ExpertSet:
    """An eval-mode site with weights that matter: nonzero B, a router strong enough to route tokens apart."""
    e, r, k = sizes[method]
    torch.manual_seed(seed)
    cfg = ac.AdaMoLEConfig(method=method, num_experts=e, rank=r, dropout=0.0, top_k=k)
    site = ExpertSet(D, OUT, cfg, torch.float32).eval()
    with torch.no_grad():
        site.lora_B.normal_(0.0, 0.5)
        for w in (site.gate, site.threshold_weight):
            if w is not None:
                w.mul_(3.0)
    return site


def torch_form(site: ExpertSet, x: Tensor, base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, D], base [T, O] -> the op's torch path: (out, scores, mask)."""
    out, scores, mask, *_ = adapter(*site.op_args(x, None, base)._replace(kernels="torch"))
    return out, scores, mask


def tie_free(site: ExpertSet, seed: int) -> tuple[Tensor, Tensor]:
    """(x [T, D], base [T, O]) whose routing decisions are MARGIN from a tie, redrawing the tokens near one."""
    g = torch.Generator().manual_seed(seed)
    x, base = torch.randn(T, D, generator=g), torch.randn(T, OUT, generator=g)
    for _ in range(100):
        near = _near_tie(site, x)  # [T] bool
        if not near.any():
            return x, base
        x[near] = torch.randn(int(near.sum()), D, generator=g)
    raise AssertionError("could not draw tie-free inputs")


def _near_tie(site: ExpertSet, x: Tensor) -> Tensor:
    """x [T, D] -> [T] bool: tokens with a routing decision within MARGIN of a tie (the op's own scores and
    logits: a = p - tau for adamole, the gap between the k-th and (k+1)-th logits for mole)."""
    with torch.no_grad():
        _, scores, _, _, zr, *_ = adapter(*site.op_args(x, None, None)._replace(kernels="torch"))
    if site.method == "adamole":
        return (scores.abs() < MARGIN).any(-1)
    if site.method == "mole" and site.top_k < site.num_experts:
        top = zr.topk(site.top_k + 1, dim=-1).values  # [T, k+1]
        return top[:, -2] - top[:, -1] < MARGIN
    return torch.zeros(x.shape[0], dtype=torch.bool)


def triton_form(site: ExpertSet, x: Tensor, base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The op with kernels='triton' (on CUDA, else in Triton's interpreter), results on CPU."""
    on_dev = copy.deepcopy(site).to(DEVICE)
    args = on_dev.op_args(x.to(DEVICE), None, base.to(DEVICE))._replace(kernels="triton")
    out, scores, mask, *_ = adapter(*args)
    return out.cpu(), scores.cpu(), mask.cpu()


def mixed_form(site: ExpertSet, others: list[ExpertSet], x: Tensor, base: Tensor,
               all_slots: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """A batch of two rows [2, T, D]: row 0 runs `site` (slot 0 of a stack with `others`), row 1 no adapter."""
    stack = stack_sites([site.weights()] + [o.weights() for o in others])
    slot = torch.tensor([0, len(others) + 1])  # the last slot: no adapter
    delta, scores, mask = mixed_adapter(torch.stack([x, x]), slot, stack, all_slots=all_slots)  # [2, T, *]
    e = site.num_experts
    assert not delta[1].any(), "a row without an adapter changed"
    assert not mask[0, :, e:].any(), "a padded expert was selected"
    return base + delta[0], scores[0, :, :e], mask[0, :, :e]


class OpModule(nn.Module):
    """x [T, D], base [T, O] -> the op's (out, scores, mask) for one site, as a graph's op node computes them."""

    def __init__(self, site: ExpertSet) -> None:
        super().__init__()
        self.site = site

    def forward(self, x: Tensor, base: Tensor):
        return adapter(*self.site.op_args(x, None, base))[:3]


def onnx_form(site: ExpertSet, x: Tensor, base: Tensor, path) -> tuple[Tensor, Tensor, Tensor]:
    """Export `OpModule(site)` with the op's translation (dynamic T) and run it with onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from amole_compile.export._translation import translation_table

    prog = torch.onnx.export(OpModule(site).eval(), (x, base), input_names=["x", "base"],
                             output_names=["out", "scores", "mask"], dynamo=True, verbose=False,
                             custom_translation_table=translation_table(), dynamic_shapes=({0: "t"}, {0: "t"}))
    prog.save(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out, scores, mask = sess.run(None, {"x": x.numpy(), "base": base.numpy()})
    return torch.from_numpy(out), torch.from_numpy(scores), torch.from_numpy(mask)


def assert_routing_varied(method: str, mask: Tensor) -> None:
    """mask [T, E]: the inputs exercise the routing (experts masked for some tokens and not others)."""
    if method == "lora":
        assert mask.shape == (T, 1) and bool(mask.all())
        return
    assert bool(mask.any(-1).all()), "a token selected no expert"
    assert bool((~mask).any()), "no expert was ever masked"
    assert bool((mask != mask[:1]).any()), "every token routes the same"


def assert_forms_equal(forms: Forms, ref: str = "torch") -> None:
    """Every form's (out, scores, mask) equals the reference form's: masks exactly, the rest within RTOL/ATOL."""
    want = forms[ref]
    for form, got in forms.items():
        for name, g, w in zip(("out", "scores", "mask"), got, want, strict=True):
            assert g.shape == w.shape, f"{form} {name}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
            if w.dtype == torch.bool:
                assert torch.equal(g, w), f"{form}: expert masks differ from {ref} at {(g != w).nonzero()[:4]}"
            else:
                torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=lambda m, f=form, n=name: f"{f} {n}: {m}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_form_computes_the_same_site(method, tmp_path, monkeypatch):
    monkeypatch.delenv("AMOLE_KERNELS", raising=False)  # the forms pick their kernels themselves
    seeds = {m: i for i, m in enumerate(sorted(METHODS))}
    site = make_site(method, seeds[method])
    others = [make_site(m, 10 + seeds[m], OTHER_SIZES) for m in sorted(METHODS)]
    x, base = tie_free(site, seed=10 + seeds[method])
    with torch.no_grad():
        forms: Forms = {"torch": torch_form(site, x, base)}
        assert_routing_varied(method, forms["torch"][2])
        if triton_usable(torch.zeros(1, device=DEVICE), explicit=True)[0]:
            forms["triton"] = triton_form(site, x, base)
        forms["mixed"] = mixed_form(site, others, x, base)  # among every method's: routes picked per row
        forms["mixed alone"] = mixed_form(site, [], x, base, all_slots=True)  # one method: its routing alone
        forms["onnx"] = onnx_form(site, x, base, tmp_path / f"{method}.onnx")
    assert_forms_equal(forms)
    if DEVICE == "cpu" and "triton" not in forms:
        pytest.skip("Triton form not run (no triton, or TRITON_INTERPRET unset); the other forms agree")
