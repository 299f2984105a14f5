"""Checked on load: tensors must be floating point and finite (a precision drop warns), the model type is
compared (a warning), meta-device targets are refused with the fix, malformed fields raise errors naming the
field and the value, and a weights file that is not the one the config names is refused. Every failed load
leaves the model as it was."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import amole_compile as ac
from amole_compile.checkpoint.schema import AdapterLoadWarning
from amole_compile.model.state import adapter_state

from models import build, seal

CFG = ac.AdaMoLEConfig(num_experts=2, rank=2)
KEY = "model.layers.0.self_attn.q_proj.adapters.default.q.lora_B"


@pytest.fixture
def saved(tmp_path):
    model = ac.transform(build("llama"), CFG)
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.normal_(0, 0.1)
    return ac.save_adapters(model, tmp_path / "a")


def edit_tensors(folder, fn) -> None:
    tensors = load_file(folder / "adapters.safetensors")
    fn(tensors)
    save_file(tensors, folder / "adapters.safetensors")
    seal(folder)


def edit_config(folder, fn) -> None:
    meta = json.loads((folder / "amole_config.json").read_text())
    fn(meta)
    (folder / "amole_config.json").write_text(json.dumps(meta))


def refused(folder, pattern, model=None, exc=ValueError):
    """load_adapters raises `exc` matching `pattern`; the model is left as it was."""
    model = build("llama") if model is None else model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=pattern):
        ac.load_adapters(model, folder)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("value,pattern", [
    (torch.zeros(64, 4, dtype=torch.int64), r"has dtype torch\.int64; adapter tensors are floating point"),
    (torch.zeros(64, 4, dtype=torch.bool), r"has dtype torch\.bool"),
    (torch.full((64, 4), float("nan")), r"holds 256 non-finite value\(s\) \(NaN or inf\) of 256"),
    (torch.zeros(64, 4).index_fill_(0, torch.tensor([3]), float("inf")), r"holds 4 non-finite"),
], ids=["int64", "bool", "nan", "inf"])
def test_wrong_dtype_and_non_finite_values_are_refused(saved, value, pattern):
    edit_tensors(saved, lambda t: t.__setitem__(KEY, value))
    refused(saved, re.escape(repr(KEY)) + ".*" + pattern)


def test_a_precision_drop_warns_and_loads(saved):
    edit_tensors(saved, lambda t: t.update({k: v.double() for k, v in t.items()}))
    model = build("llama")
    with pytest.warns(AdapterLoadWarning, match=r"lose precision on load: .*torch\.float64 in the file and "
                                                 r"torch\.float32 in the model"):
        ac.load_adapters(model, saved)
    assert torch.equal(model.get_parameter(KEY), load_file(saved / "adapters.safetensors")[KEY].float())


def test_another_model_type_warns(saved, recwarn):
    ac.load_adapters(build("llama"), saved)
    assert not [w for w in recwarn if issubclass(w.category, AdapterLoadWarning)]
    assert json.loads((saved / "amole_config.json").read_text())["model_type"] == "llama"
    edit_config(saved, lambda m: m.update(model_type="mistral"))
    with pytest.warns(AdapterLoadWarning, match="saved from a 'mistral' model; loading them into a 'llama' model"):
        ac.load_adapters(build("llama"), saved)


def test_meta_device_targets_are_refused_with_the_fix(saved):
    """A model built on the meta device (init_empty_weights) has nowhere to put the values: refused, and the
    error says to materialise it first; the model is left untransformed."""
    with torch.device("meta"):
        model = build("llama")
    with pytest.raises(ValueError, match=r"meta device .* Materialise the model first: model\.to_empty"):
        ac.load_adapters(model, saved)
    assert not ac.is_transformed(model)


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: m.update(format_version="2"), r"format_version must be a positive integer .*got str '2'"),
    (lambda m: m.update(format_version=True), r"format_version must be a positive integer .*got bool True"),
    (lambda m: m.update(adapters=[m["adapters"]["default"]]), r"adapters must be an object .*got list \["),
    (lambda m: m.update(adapters={}), r"adapters is empty"),
    (lambda m: m.pop("adapters"), r"no `adapters` field"),
    (lambda m: m.update(active="other"), r"active must be one of the adapters \['default'\], got str 'other'"),
    (lambda m: m["adapters"]["default"].update(config=[]), r"adapters\['default'\]\.config must be an object"),
    (lambda m: m["adapters"]["default"]["config"].update(rank=-1),
     r"adapters\['default'\]\.config: .*rank"),
    (lambda m: m["adapters"]["default"]["targets"][1].update(in_features="64"),
     r"adapters\['default'\]\.targets\[1\]\.in_features must be a positive integer, got str '64'"),
    (lambda m: m["adapters"]["default"]["targets"][0].update(slices=[{"start": 0, "stop": 999}]),
     r"targets\[0\]\.slices\[0\] must be \{start, stop\} with 0 <= start < stop <= out_features \(64\), got"),
    (lambda m: m["weights"].update(file="../../etc/passwd"), r"weights\.file must be adapters\.safetensors"),
    (lambda m: m["weights"].update(sha256="xyz"), r"weights\.sha256 must be 64 lowercase hex digits"),
    (lambda m: m.update(model_type=3), r"model_type must be a string, got int 3"),
], ids=["version_str", "version_bool", "adapters_list", "adapters_empty", "adapters_missing", "active",
        "config_list", "config_value", "in_features_str", "slice_range", "weights_path", "weights_hash",
        "model_type"])
def test_malformed_fields_name_the_field_and_the_value(saved, edit, pattern):
    edit_config(saved, edit)
    refused(saved, re.escape(str(saved / "amole_config.json")) + ".*" + pattern)


def test_edited_slices_print_the_columns(tmp_path):
    """GPT-2's fused c_attn: a target whose role columns were edited names both column sets (before, the two
    descriptions printed the same roles and sizes)."""
    folder = ac.save_adapters(ac.transform(build("gpt2"), CFG), tmp_path / "g")
    edit_config(folder, lambda m: m["adapters"]["default"]["targets"][0]["slices"].reverse())
    refused(folder, r"transformer\.h\.0\.attn\.c_attn: the adapters expect the output columns q 128:192, k 64:128, "
                    r"v 0:64; the model's roles own the columns q 0:64, k 64:128, v 128:192", model=build("gpt2"))


def test_weights_of_another_save_are_refused(saved, tmp_path):
    """The config names its weights with their size and hash: a weights file from another save (the same keys
    and shapes: it would load without complaint) is refused; a folder without the manifest still loads."""
    other = ac.transform(build("llama"), CFG)
    with torch.no_grad():
        for p in adapter_state(other).values():
            p.fill_(0.5)
    ac.save_adapters(other, tmp_path / "other")
    (saved / "adapters.safetensors").write_bytes((tmp_path / "other" / "adapters.safetensors").read_bytes())
    refused(saved, r"adapters\.safetensors \(\d+ bytes, sha256 [0-9a-f]{12}\.\.\.\) is not the file "
                   r"amole_config\.json names .* different saves")
    edit_config(saved, lambda m: m.pop("weights"))  # as written before the manifest: read as it is
    model = ac.load_adapters(build("llama"), saved)
    assert torch.equal(model.get_parameter(KEY), torch.full_like(model.get_parameter(KEY), 0.5))


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_load_changes_values_not_what_trains(saved):
    """The user trains the LM head too and froze one gate: a failed load (another rank), a load of values into
    the existing adapter, and switching adapters leave those flags alone (before, each froze the head and thawed
    the gate); a second transform freezes every parameter but its adapter's, as documented."""
    model = ac.transform(build("llama"), CFG)
    model.lm_head.weight.requires_grad_(True)
    gate = model.model.layers[0].self_attn.q_proj.adapters["default"]["q"].gate
    gate.requires_grad_(False)
    want = _flags(model)
    other = ac.transform(build("llama"), ac.AdaMoLEConfig(num_experts=2, rank=3))
    ac.save_adapters(other, saved.parent / "rank3")
    with pytest.raises(ValueError, match="rank"):
        ac.load_adapters(model, saved.parent / "rank3")
    assert _flags(model) == want
    ac.load_adapters(model, saved)
    assert _flags(model) == want
    ac.transform(model, CFG, adapter_name="b")
    assert not model.lm_head.weight.requires_grad  # a transform freezes the base
    model.lm_head.weight.requires_grad_(True)
    ac.set_active_adapter(model, "default")
    assert model.lm_head.weight.requires_grad and gate.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters.b." in n)
    ac.set_active_adapter(model, None)
    assert model.lm_head.weight.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." in n)
