"""Bad input to export_onnx: clear errors, nothing left behind, and failures that name the module and op."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import amole_compile as ac
from amole_compile.cli.load import export_from_dirs
from amole_compile.export import onnx as export_mod
from amole_compile.export.onnx import OnnxExportError

from models import build, build_matrix


@torch.library.custom_op("amole_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """An op with no ONNX translation."""
    return x.clone()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(torch.nn.Module):
    def forward(self, x):
        return mystery(x)


class Branchy(torch.nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow: torch.export cannot capture it


def test_import_does_not_load_onnx():
    code = ("import amole_compile, sys; "
            "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_or_bad_directory(tmp_path):
    model = build("gpt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ac.export_onnx(model, tmp_path / "nope" / "m.onnx")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        ac.export_onnx(model, tmp_path / "file" / "m.onnx")
    with pytest.raises(IsADirectoryError):
        ac.export_onnx(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_from_dirs(tmp_path / "no-model", None, tmp_path / "nope" / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unwritable_directory(tmp_path):
    """A directory we may not write to: permission bits for a normal user; /proc (no regular files, even for
    root) when the tests run as root."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        with pytest.raises(PermissionError, match="not writable"):
            ac.export_onnx(build("gpt2"), "/proc/m.onnx")
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            ac.export_onnx(build("gpt2"), locked / "m.onnx")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_bad_options(tmp_path):
    model = build("gpt2")
    with pytest.raises(ValueError, match="masking"):
        ac.export_onnx(model, tmp_path / "m.onnx", masking="sparse")
    with pytest.raises(ValueError, match="opset"):
        ac.export_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(TypeError, match="kv_cache=True needs a causal LM"):
        ac.export_onnx(build("bert"), tmp_path / "m.onnx", kv_cache=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = build("gpt2", n_layer=1)

    def broken_check(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr("onnx.checker.check_model", broken_check)
    with pytest.raises(RuntimeError, match="simulated"):
        ac.export_onnx(model, tmp_path / "m.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_untranslatable_op_names_module_and_op(tmp_path):
    model = build("llama", num_hidden_layers=1)
    model.model.layers[0].mlp.act_fn = Mystery()
    with pytest.raises(OnnxExportError) as info:
        ac.export_onnx(model, tmp_path / "m.onnx")
    first = str(info.value).splitlines()[0]
    assert "amole_test.mystery" in first and "model.layers.0.mlp.act_fn (Mystery)" in first, first
    assert list(tmp_path.iterdir()) == []


def test_uncapturable_module_is_named(tmp_path):
    model = build("llama")
    model.model.layers[0].mlp.act_fn = Branchy()
    with pytest.raises(OnnxExportError, match=r"torch.export failed in module model.layers.0.mlp.act_fn \(Branchy\)"):
        ac.export_onnx(model, tmp_path / "m.onnx")
    assert export_mod.DEFAULT_OPSET == 20


class ByIds(torch.nn.Module):
    """A hand-written model whose forward reads token ids under a name of its own, and no attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.q = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8)

    def forward(self, ids):
        return self.q(self.emb(ids))


@pytest.mark.parametrize("name, message", [
    ("vit", r"ViTModel reads pixel_values: not supported"),
    ("t5", r"T5Model is an encoder-decoder, whose decoder needs inputs of its own: not supported"),
    (None, r"ByIds.forward takes no input_ids and no attention_mask"),
])
def test_a_model_without_token_ids_is_refused_by_name(tmp_path, name, message):
    """The scoring graph reads input_ids and attention_mask: a model that reads other inputs is refused with a
    TypeError saying what it reads (before, the example forward failed inside the model: an AttributeError on
    None, or T5's "specify exactly one of input_ids or inputs_embeds"), and nothing is written."""
    model = ByIds() if name is None else build_matrix(name)
    with pytest.raises(TypeError, match=r"export_onnx writes the graph of a causal LM or an encoder over input_ids.*"
                                        + message):
        ac.export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
