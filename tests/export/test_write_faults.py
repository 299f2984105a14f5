"""ONNX writes are transactions. The write step of every export (`_pipeline.write`: `.onnx`, with external data
`.onnx` + `.onnx.data`) and the genai folder (`export_genai`, its graph replaced by a tiny one so that a run
takes milliseconds) are killed at each file-system step (`faults.kills`): onnxruntime then reads the old export
or the new one, never the old graph with the new data, and the next export removes what the killed one left.
Also: a file that is not ours, or is read-only, is not replaced without overwrite=True."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import amole_compile as ac
from amole_compile.export import _pipeline, genai
from amole_compile.model.state import adapter_state

from faults import kills, needs_fork
from models import build

WIDTH = 32  # a 32 x 32 float weight: 4 KiB, above onnx_ir's 256-byte threshold for external data
X = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)


def tiny_graph(seed: int) -> ir.Model:
    """y = x @ W + b with W, b drawn from `seed`."""
    rng = np.random.default_rng(seed)
    w = onnx.numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), "W")
    b = onnx.numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), "b")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["h"]), onnx.helper.make_node("Add", ["h", "b"], ["y"])],
        "tiny", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, WIDTH])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, WIDTH])], [w, b])
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))


def ort_output(path) -> np.ndarray | str:
    """What onnxruntime computes from the file (or the error it raises)."""
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    except Exception as exc:  # a reader that fails sees neither state
        return f"{type(exc).__name__}: {exc}"


@needs_fork
@pytest.mark.parametrize("old_external,new_external", [(True, True), (False, True), (True, False), (None, True)],
                         ids=["data-to-data", "inline-to-data", "data-to-inline", "new-file"])
def test_onnx_write_killed_at_each_step_runs_old_or_new(old_external, new_external, tmp_path):
    folder, dest = tmp_path / "work", tmp_path / "work" / "m.onnx"
    pristine = tmp_path / "old"
    pristine.mkdir()
    if old_external is not None:
        _pipeline.write(tiny_graph(1), pristine / "m.onnx", old_external)
    old = ort_output(pristine / "m.onnx") if old_external is not None else None
    new_graph = tiny_graph(2)

    def reset() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pristine, folder)

    seen = []
    for k in kills(lambda: _pipeline.write(new_graph, dest, new_external), reset):
        now = ort_output(dest) if dest.exists() else None
        seen.append("old" if _equal(now, old) else "new" if _equal(now, _new(new_graph, tmp_path)) else
                    f"neither at step {k}: {now if isinstance(now, str) else 'other numbers'}")
        _pipeline.write(new_graph, dest, new_external)  # the next export cleans up after the killed one
        assert sorted(os.listdir(folder)) == (["m.onnx", "m.onnx.data"] if new_external else ["m.onnx"]), k
    assert not [s for s in seen if s not in ("old", "new")], seen
    assert len(seen) > 5 and "new" in seen and "old" in seen, seen  # old: no file at all for "new-file"


def _new(graph, tmp_path) -> np.ndarray:
    ref = tmp_path / "ref.onnx"
    if not ref.exists():
        _pipeline.write(graph, ref, False)
    return ort_output(ref)


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    return a is None and b is None


def _contents(folder) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@needs_fork
@pytest.mark.filterwarnings("ignore::amole_compile.export.genai.MissingTokenizerWarning")
def test_genai_folder_killed_at_each_step_is_old_or_new(tmp_path, monkeypatch):
    """The genai folder (graph, genai_config.json, one `.onnx_adapter`) is swapped in whole: killed at any
    step, the folder holds exactly the old files or exactly the new ones."""
    graph = {"seed": 1}

    def fake_export_graph(model, make_spec, dest, options, edit=None):
        spec = make_spec()
        _pipeline.write(tiny_graph(graph["seed"]), dest, options.external_data)
        return spec

    monkeypatch.setattr(genai, "export_graph", fake_export_graph)
    torch.manual_seed(0)
    model = ac.transform(build("llama", num_hidden_layers=1), ac.AdaMoLEConfig(num_experts=2, rank=2),
                         adapter_name="a")
    old_dir, new_dir, dest = tmp_path / "old" / "g", tmp_path / "new" / "g", tmp_path / "work" / "g"
    old_dir.parent.mkdir(), new_dir.parent.mkdir()
    ac.export_onnx(model, old_dir, genai=True, adapters=["a"])
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.add_(0.5)
    graph["seed"] = 2
    ac.export_onnx(model, new_dir, genai=True, adapters=["a"])
    old, new = _contents(old_dir), _contents(new_dir)
    assert old != new and set(new) == {"model.onnx", "genai_config.json", "a.onnx_adapter"}

    def reset() -> None:
        shutil.rmtree(dest.parent, ignore_errors=True)
        shutil.copytree(old_dir.parent, dest.parent)

    seen = []
    for k in kills(lambda: ac.export_onnx(model, dest, genai=True, adapters=["a"]), reset):
        now = _contents(dest)
        seen.append("old" if now == old else "new" if now == new else f"neither at step {k}: {sorted(now or [])}")
        ac.export_onnx(model, dest, genai=True, adapters=["a"])
        assert os.listdir(dest.parent) == ["g"] and _contents(dest) == new, k
    assert not [s for s in seen if s not in ("old", "new")], seen
    assert "old" in seen and "new" in seen, seen


# ---- what an export may replace -------------------------------------------------------------------------------
def test_a_file_that_is_not_ours_or_is_read_only_is_not_replaced(tmp_path):
    """check_output is export_onnx's first step: a foreign file, a read-only export of ours, or a lone data file
    are refused (FileExistsError naming overwrite=True) before any work; overwrite=True lets them through."""
    foreign, lone, mine = tmp_path / "notes.onnx", tmp_path / "lone.onnx", tmp_path / "mine.onnx"
    foreign.write_text("someone's notes")
    (tmp_path / "lone.onnx.data").write_bytes(b"data")
    _pipeline.write(tiny_graph(1), mine, True)
    from amole_compile.export.onnx import check_output

    assert check_output(mine) == mine  # an earlier export of ours is replaced
    os.chmod(mine, 0o444)
    for path, why in [(foreign, "not written by amole_compile"), (lone, "without lone.onnx"), (mine, "read-only")]:
        with pytest.raises(FileExistsError, match=f"{why}.*overwrite=True"):
            ac.export_onnx(build("gpt2"), path)
        assert check_output(path, overwrite=True) == path
    assert foreign.read_text() == "someone's notes" and (tmp_path / "lone.onnx.data").read_bytes() == b"data"


@pytest.mark.slow
def test_overwrite_replaces_a_read_only_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_text("old")
    os.chmod(path, 0o444)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ac.export_onnx(build("gpt2", n_layer=1), path, overwrite=True)
    assert _pipeline.is_ours(path) and isinstance(ort_output(path), str)  # ours now (inputs differ from X's)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_onnx_files_get_the_mode_the_umask_gives(tmp_path, umask):
    import stat

    before = os.umask(umask)
    try:
        _pipeline.write(tiny_graph(1), tmp_path / "m.onnx", True)
    finally:
        os.umask(before)
    for name in ("m.onnx", "m.onnx.data"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
