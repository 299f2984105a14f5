"""The translations of `amole::adapter` alone: all five outputs equal the torch op's, for every method, with
and without dropout mask and base, dense and skip (paths a whole-model eval export never takes)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from amole_compile.export._translation import translation_table
from amole_compile.kernels import adapter

T, D, OUT, E, R = 16, 12, 10, 4, 2  # tokens, in dims, out dims, experts, rank


class OneSite(torch.nn.Module):
    """x [T, D], drop mask, base [T, OUT] -> the op's seven outputs (no aux loss: an inference forward)."""

    def __init__(self, method: str, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        e = 1 if method == "lora" else E
        self.method, self.e = method, e
        self.a = torch.nn.Parameter(torch.randn(e * R, D, generator=g) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(OUT, e * R, generator=g) * 0.5)
        self.gate = torch.nn.Parameter(torch.randn(e, D, generator=g)) if method != "lora" else None
        self.tw = torch.nn.Parameter(torch.randn(1, D, generator=g)) if method == "adamole" else None
        self.tb = torch.nn.Parameter(torch.randn(1, generator=g)) if method == "adamole" else None

    def forward(self, x, drop, base):
        return adapter(x, drop, self.a, self.b, self.gate, self.tw, self.tb, base, self.method, self.e,
                       2 if self.method == "mole" else 0, 1.5, 0.3 if self.method == "adamole" else 0.0,
                       1.25, "torch")


CASES = [("adamole", True, True, "dense"), ("adamole", False, False, "dense"), ("mole", True, False, "dense"),
         ("lora", True, True, "dense"), ("adamole", True, True, "skip"), ("mole", False, True, "skip")]


@pytest.mark.parametrize("method,dropout,with_base,masking", CASES)
def test_op_outputs_match_torch(method, dropout, with_base, masking, tmp_path):
    site = OneSite(method, seed=len(method) + dropout)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g)
    drop = torch.rand(T, D, generator=g) > 0.2 if dropout else None
    base = torch.randn(T, OUT, generator=g) if with_base else None
    args = (x, drop, base)
    names = [n for n, a in zip(("x", "drop", "base"), args, strict=True) if a is not None]
    prog = torch.onnx.export(site, args, input_names=names, dynamo=True, verbose=False,
                             custom_translation_table=translation_table(masking),
                             dynamic_shapes=({0: "t"}, {0: "t"} if dropout else None,
                                             {0: "t"} if with_base else None))
    prog.save(tmp_path / "op.onnx")
    sess = ort.InferenceSession(str(tmp_path / "op.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = site(*args)
    if method == "adamole":
        assert 0 < int(want[2].sum()) < want[2].numel() and want[1].abs().min() > 1e-6  # masked, no ties
    feeds = [a for a in args if a is not None]
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, feeds, strict=True)})
    assert len(got) == 7
    for name, w, o in zip(("out", "scores", "mask", "za", "zr", "aux", "aux_sums"), want, got, strict=True):
        assert tuple(o.shape) == tuple(w.shape), name
        if w.dtype == torch.bool:
            assert (torch.from_numpy(o) == w).all(), name
        else:
            err = (torch.from_numpy(o) - w).abs().max().item() if w.numel() else 0.0
            assert torch.allclose(torch.from_numpy(o), w, atol=1e-5, rtol=1e-5), (name, err)


def test_translations_take_the_op_schema_in_order():
    """The exporter matches a node's arguments on a translation's parameters: they are the op's schema,
    `AdapterArgs`' fields, in order."""
    import inspect

    from amole_compile.kernels import AdapterArgs, register

    register()
    op_schema = tuple(a.name for a in torch.ops.amole.adapter.default._schema.arguments)
    assert AdapterArgs._fields == op_schema
    for masking in ("dense", "skip"):
        fn = translation_table(masking)[torch.ops.amole.adapter.default]
        assert tuple(inspect.signature(fn).parameters) == op_schema, masking


def test_a_training_forward_is_refused_by_name():
    """The aux loss is a training output: a node asking for it has no translation, and says so."""
    fn = translation_table("dense")[torch.ops.amole.adapter.default]
    with pytest.raises(ValueError, match="with_aux=True.*eval mode"):
        fn(None, None, None, None, None, None, None, None, "adamole", 4, 0, 1.0, 0.3, 1.0, "torch", True)
