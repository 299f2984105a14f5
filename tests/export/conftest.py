"""Exports shared across the ONNX tests (each export takes seconds, so each graph is made once per session)."""

from __future__ import annotations

import types

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import amole_compile as ac

from onnx_helpers import adapted

_SHARED = {"llama_adamole", "gpt2_adamole"}


def pytest_collection_modifyitems(items):
    """Tests on the shared exports may pay for them (20-45 s): mark them slow."""
    for item in items:
        if _SHARED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.fixture(scope="session")
def llama_adamole(tmp_path_factory):
    """A llama with AdaMoLE adapters, exported (from train mode) as scoring and as decoding graph."""
    model = adapted("llama").train()
    before = _modes(model)
    out = tmp_path_factory.mktemp("llama")
    prefill = ac.export_onnx(model, out / "model.onnx")
    after = _modes(model)
    decoder = ac.export_onnx(model, out / "decoder.onnx", kv_cache=True)
    return types.SimpleNamespace(model=model.eval(), prefill=prefill, decoder=decoder, before=before, after=after)


@pytest.fixture(scope="session")
def gpt2_adamole(tmp_path_factory):
    """GPT-2 (fused QKV Conv1D) with AdaMoLE adapters, exported as decoding graph."""
    model = adapted("gpt2")
    decoder = ac.export_onnx(model, tmp_path_factory.mktemp("gpt2") / "decoder.onnx", kv_cache=True)
    return types.SimpleNamespace(model=model, decoder=decoder)
