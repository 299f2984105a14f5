"""Upstream checkpoints as upstream writes them: fixtures made once by the upstream code itself
(tests/fixtures/upstream/make_fixtures.py: zefang-liu/AdaMoLE 5e8599a, peft 0.9.0, transformers 4.38.2), loaded
with `load_adapters` into the same base model rebuilt here, against the logits and per-token routing that
upstream's own forward gave. Fixed-threshold MoLE (upstream's ThresholdMoeLayer) is refused by name; the keys
upstream writes (`lora_rank`) and PEFT writes (`r`) are both read.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import amole_compile as ac
from amole_compile.model.modules import ExpertSet
from amole_compile.model.projection import AdaMoLELinear

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)

LOADABLE = ("adamole", "mole_top2", "lora")
# Upstream (a Python loop over experts, transformers 4.38) against ours (the stacked op, transformers 5.25), max
# |logits diff| measured on logits up to 2.8 in size. float32: the base alone 0 (bit-identical), lora 0, adamole
# 2.8e-6, mole_top2 2.4e-6 (rounding: the experts are summed in another order). float64: 0 for all three (both
# Llamas round the hidden states to float32 in each RMSNorm, which absorbs the float64 rounding); the margin
# leaves room for one float32 rounding flip, and is still 25x under the float32 tolerance.
ATOL = 5e-6
ATOL64 = 2e-7
MARGIN = 1e-4  # routing decisions this far from a tie cannot flip between the two stacks


def base_model() -> torch.nn.Module:
    """The fixtures' base model, built and filled as make_fixtures.py does, here with our transformers."""
    cfg = tf.LlamaConfig(**make.LLAMA)
    cfg._attn_implementation = "sdpa"
    return make.fill_base_(tf.LlamaForCausalLM(cfg)).eval()


def expected(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What upstream's forward gave for fixture `name`: (tensors, metadata) of its expected.safetensors."""
    with safe_open(str(FIXTURES / name / "expected.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["fixture"])


def run(model: torch.nn.Module, input_ids: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, dict]:
    """-> (logits, {module fqn: (mask [T, E] bool, scores [T, E])}) of one eval forward of `model`."""
    sites = {id(m.group[m.roles[0]]): fqn for fqn, m in model.named_modules() if isinstance(m, AdaMoLELinear)}
    routed, record = {}, ExpertSet.record

    def spy(self, scores, mask, *args, **kwargs):
        routed[sites[id(self)]] = (mask.detach().clone(), scores.detach().clone())
        return record(self, scores, mask, *args, **kwargs)

    monkeypatch.setattr(ExpertSet, "record", spy)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    monkeypatch.setattr(ExpertSet, "record", record)
    return logits, routed


def test_fixtures_are_what_upstream_writes():
    """The committed files are upstream's: `lora_rank` (no `r`), adapter_model.bin with the duplicate keys."""
    for name, (_cls, kwargs) in make.FIXTURES.items():
        config = json.loads((FIXTURES / name / "adapter_config.json").read_text())
        assert config["lora_rank"] == kwargs["lora_rank"] and "r" not in config, name
        raw = torch.load(FIXTURES / name / "adapter_model.bin", weights_only=True)
        assert all(k.startswith("base_model.model.model.layers.") for k in raw), name
        assert any(".moe_layer." in k for k in raw) == (name != "lora"), name
        _, meta = expected(name)
        assert (meta["peft"], meta["transformers"]) == ("0.9.0", "4.38.2"), name


def test_base_model_is_the_fixtures_base():
    """The rebuilt base has the parameters the fixtures were made with and gives upstream's base logits."""
    tensors, meta = expected("adamole")
    base = base_model()
    assert make.param_signature(base) == meta["params"]
    with torch.no_grad():
        got = base(input_ids=tensors["input_ids"]).logits
    torch.testing.assert_close(got, tensors["base_logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", LOADABLE)
def test_upstream_checkpoint_gives_upstream_logits_and_routing(name, monkeypatch):
    tensors, _ = expected(name)
    model = ac.load_adapters(base_model(), FIXTURES / name)
    logits, routed = run(model, tensors["input_ids"], monkeypatch)
    assert (logits - tensors["base_logits"]).abs().max() > 1.0  # the adapters matter
    torch.testing.assert_close(logits, tensors["logits"], rtol=0, atol=ATOL)
    masks = {k[len("mask."):]: v.bool() for k, v in tensors.items() if k.startswith("mask.")}
    assert len(routed) == 8 and (sorted(masks) == sorted(routed) or name == "lora")
    for fqn, want in masks.items():
        got, scores = routed[fqn]
        assert torch.equal(got, want), fqn
        if name == "adamole":  # shifted scores a = p - tau: no token sits at a tie (a == 0)
            assert scores.abs().min() > MARGIN, fqn
        else:  # probabilities: the second and third largest are apart
            top = scores.sort(-1, descending=True).values
            assert (top[:, 1] - top[:, 2]).min() > MARGIN, fqn


@pytest.mark.parametrize("name", LOADABLE)
def test_upstream_checkpoint_in_float64(name, monkeypatch):
    """In float64 both stacks give the same logits: an error in the adapter math of 1e-6, which the float32
    tolerance could hide, shows here."""
    tensors, _ = expected(name)
    model = ac.load_adapters(base_model().double(), FIXTURES / name)
    logits, _ = run(model, tensors["input_ids"], monkeypatch)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, tensors["logits_f64"], rtol=0, atol=ATOL64)


def edited(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of fixture `name` whose adapter_config.json has `changes` (a value None: the key removed)."""
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    config = json.loads((out / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes", [{}, {"r": 2}], ids=["as_written", "with_r"])
def test_fixed_threshold_mole_is_refused_by_name(changes, tmp_path):
    """Upstream's ThresholdMoeLayer (top_k null, threshold 0.25) is not top-k: an error naming the checkpoint,
    `threshold` and why, also with PEFT's `r` added by hand (which once imported it as top-2); the model is
    left untouched."""
    base = base_model()
    path = edited(tmp_path, "mole_threshold", **changes)
    with pytest.raises(ValueError, match=r"mole_threshold/adapter_config\.json: MOLE with threshold=0\.25 "
                                         r"\(top_k=None\) is the upstream ThresholdMoeLayer.*top-k"):
        ac.load_adapters(base, path)
    assert not ac.is_transformed(base)


def test_fixed_threshold_mole_read_as_top_k_would_be_wrong(tmp_path, monkeypatch):
    """Why the refusal: the same weights routed top-2 are far from what upstream computed."""
    tensors, _ = expected("mole_threshold")
    model = ac.load_adapters(base_model(), edited(tmp_path, "mole_threshold", threshold=None, top_k=2))
    logits, _ = run(model, tensors["input_ids"], monkeypatch)
    assert (logits - tensors["logits"]).abs().max() > 0.5  # measured 1.08


@pytest.mark.parametrize("changes", [{"r": 2}, {"lora_rank": None, "r": 2}], ids=["both", "r_only"])
def test_rank_read_from_lora_rank_or_r(changes, tmp_path, monkeypatch):
    """PEFT's name `r` is read too, alone or beside an equal `lora_rank`: the same model either way."""
    tensors, _ = expected("adamole")
    model = ac.load_adapters(base_model(), edited(tmp_path, "adamole", **changes))
    logits, _ = run(model, tensors["input_ids"], monkeypatch)
    torch.testing.assert_close(logits, tensors["logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name,changes,match", [
    ("adamole", {"lora_rank": None}, "missing key 'lora_rank'"),
    ("adamole", {"r": 4}, "lora_rank=2 and r=4 disagree"),
    ("lora", {"lora_alpha": None}, "missing key 'lora_alpha'"),
    ("mole_top2", {"top_k": None}, "MOLE with neither top_k nor threshold"),
    ("mole_top2", {"threshold": 0.3}, "MOLE with threshold=0.3 .top_k=2."),
])
def test_config_errors_name_the_key(name, changes, match, tmp_path):
    base = base_model()
    with pytest.raises(ValueError, match=match):
        ac.load_adapters(base, edited(tmp_path, name, **changes))
    assert not ac.is_transformed(base)
