"""AdaMoLEConfig: validation of every field, defaults, derived values, JSON round trip, unknown keys."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amole_compile import AdaMoLEConfig

FIELDS = [f.name for f in dataclasses.fields(AdaMoLEConfig)]

# (field, bad value, extra kwargs that make the rest of the config valid)
BAD = [
    ("method", "adamole2", {}), ("method", "", {}), ("method", None, {}), ("method", 1, {}),
    ("method", "AdaMoLE", {}),
    ("num_experts", 0, {}), ("num_experts", -3, {}), ("num_experts", 2.0, {}), ("num_experts", True, {}),
    ("num_experts", "8", {}), ("num_experts", 2, {"method": "lora"}), ("num_experts", 8, {"method": "lora"}),
    ("rank", 0, {}), ("rank", -1, {}), ("rank", 4.0, {}), ("rank", True, {}), ("rank", None, {}), ("rank", "4", {}),
    ("alpha", 0, {}), ("alpha", -1.0, {}), ("alpha", math.nan, {}), ("alpha", math.inf, {}), ("alpha", True, {}),
    ("alpha", None, {}), ("alpha", "16", {}),
    ("dropout", -0.01, {}), ("dropout", 1.0, {}), ("dropout", 1, {}), ("dropout", 1.5, {}), ("dropout", math.nan, {}),
    ("dropout", None, {}), ("dropout", False, {}), ("dropout", "0.1", {}),
    ("max_threshold", 0.0, {}), ("max_threshold", 0, {}), ("max_threshold", -0.1, {}), ("max_threshold", 1.0001, {}),
    ("max_threshold", math.nan, {}), ("max_threshold", math.inf, {}), ("max_threshold", True, {}),
    ("max_threshold", "0.1", {}), ("max_threshold", 0.1, {"method": "mole"}),
    ("max_threshold", 0.1, {"method": "lora"}),
    ("top_k", 0, {"method": "mole"}), ("top_k", 9, {"method": "mole"}),
    ("top_k", 3, {"method": "mole", "num_experts": 2}),
    ("top_k", 1.0, {"method": "mole"}), ("top_k", True, {"method": "mole"}), ("top_k", "2", {"method": "mole"}),
    ("top_k", 2, {"method": "adamole"}), ("top_k", 1, {"method": "lora"}),
    ("roles", "q", {}), ("roles", "qkvo", {}), ("roles", (), {}), ("roles", [], {}), ("roles", ("x",), {}),
    ("roles", ("q", "q"), {}), ("roles", ("Q",), {}), ("roles", None, {}), ("roles", 3, {}), ("roles", {"q"}, {}),
    ("include", "(", {}), ("include", "[a-", {}), ("include", 3, {}), ("include", b"q_proj", {}),
    ("exclude", "*x", {}), ("exclude", ")", {}), ("exclude", ["o_proj"], {}),
    ("adapter_dtype", "float64", {}), ("adapter_dtype", "int8", {}), ("adapter_dtype", "fp16", {}),
    ("adapter_dtype", torch.float32, {}), ("adapter_dtype", "", {}),
    ("kernels", "cuda", {}), ("kernels", None, {}), ("kernels", "", {}), ("kernels", "Triton", {}),
    ("aux_loss_coef", -1e-3, {}), ("aux_loss_coef", float("nan"), {}), ("aux_loss_coef", "0.1", {}),
    ("aux_loss_coef", None, {}), ("aux_loss_coef", True, {}),
]


@pytest.mark.parametrize("field,value,extra", BAD, ids=[f"{f}={v!r}-{e}" for f, v, e in BAD])
def test_bad_value_raises_naming_the_field(field, value, extra):
    with pytest.raises(ValueError, match=rf"^AdaMoLEConfig\.{field} must be .*got "):
        AdaMoLEConfig(**{**extra, field: value})


def test_every_field_is_validated():
    assert set(FIELDS) == {f for f, _, _ in BAD}


def test_defaults():
    c = AdaMoLEConfig()
    assert (c.method, c.num_experts, c.rank, c.alpha, c.dropout) == ("adamole", 8, 4, 16.0, 0.05)
    assert (c.max_threshold, c.top_k, c.roles, c.include, c.exclude) == (None, None, ("q", "k", "v", "o"), None, None)
    assert (c.adapter_dtype, c.kernels) == (None, "auto")
    assert c.scale == 4.0 and c.threshold_cap == 0.125 and c.k == 0


@pytest.mark.parametrize("kwargs,experts,cap,k", [
    ({}, 8, 1 / 8, 0),
    ({"num_experts": 3}, 3, 1 / 3, 0),
    ({"num_experts": 1}, 1, 1.0, 0),
    ({"num_experts": 4, "max_threshold": 0.9}, 4, 0.9, 0),
    ({"max_threshold": 1}, 8, 1.0, 0),
    ({"method": "mole"}, 8, 0.0, 2),
    ({"method": "mole", "num_experts": 1}, 1, 0.0, 1),
    ({"method": "mole", "num_experts": 5, "top_k": 5}, 5, 0.0, 5),
    ({"method": "lora"}, 1, 0.0, 0),
    ({"method": "lora", "num_experts": 1}, 1, 0.0, 0),
])
def test_defaults_resolution(kwargs, experts, cap, k):
    c = AdaMoLEConfig(**kwargs)
    assert c.num_experts == experts and type(c.num_experts) is int
    assert c.threshold_cap == cap
    assert c.k == k


def test_scale_is_alpha_over_rank():
    assert AdaMoLEConfig(rank=3, alpha=7).scale == 7 / 3
    assert AdaMoLEConfig(rank=8, alpha=16).scale == 2.0


def test_roles_are_normalised_to_canonical_order():
    assert AdaMoLEConfig(roles=("o", "q")).roles == ("q", "o")
    assert AdaMoLEConfig(roles=["v", "k"]).roles == ("k", "v")
    assert isinstance(AdaMoLEConfig(roles=["q"]).roles, tuple)


def test_boundary_values_are_accepted():
    AdaMoLEConfig(dropout=0.0)
    AdaMoLEConfig(dropout=0.999)
    AdaMoLEConfig(max_threshold=1.0)
    AdaMoLEConfig(max_threshold=1e-9)
    AdaMoLEConfig(alpha=1e-9, rank=1)
    AdaMoLEConfig(include="", exclude=r"layers\.1\.")
    for dt in ("float32", "bfloat16", "float16"):
        AdaMoLEConfig(adapter_dtype=dt)
    for kern in ("auto", "torch", "triton"):
        AdaMoLEConfig(kernels=kern)


def test_frozen_and_hashable():
    c = AdaMoLEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rank = 2  # type: ignore[misc]
    assert hash(c) == hash(AdaMoLEConfig())
    assert c == AdaMoLEConfig(roles=["k", "o", "q", "v"])


# ---- JSON -----------------------------------------------------------------------------------------

def _valid_regex(s: str) -> bool:
    try:
        re.compile(s)
        return True
    except re.error:
        return False


_regex = st.one_of(st.none(), st.sampled_from([r"layers\.0\.", "q_proj$", "^model", "(a|b)+"]),
                   st.text(alphabet="ab.*_()|^$0", max_size=8).filter(_valid_regex))


@st.composite
def configs(draw):
    method = draw(st.sampled_from(["adamole", "mole", "lora"]))
    e = None if method == "lora" else draw(st.one_of(st.none(), st.integers(1, 16)))
    if method == "lora" and draw(st.booleans()):
        e = 1
    n = 1 if method == "lora" else (8 if e is None else e)
    mt = draw(st.one_of(st.none(), st.floats(0, 1, exclude_min=True))) if method == "adamole" else None
    k = draw(st.one_of(st.none(), st.integers(1, n))) if method == "mole" else None
    roles = draw(st.lists(st.sampled_from("qkvo"), min_size=1, max_size=4, unique=True))
    return AdaMoLEConfig(
        method=method, num_experts=e, rank=draw(st.integers(1, 64)),
        alpha=draw(st.one_of(st.integers(1, 64), st.floats(1e-6, 1e6, allow_nan=False))),
        dropout=draw(st.floats(0, 1, exclude_max=True)), max_threshold=mt, top_k=k, roles=tuple(roles),
        include=draw(_regex), exclude=draw(_regex),
        adapter_dtype=draw(st.sampled_from([None, "float32", "bfloat16", "float16"])),
        kernels=draw(st.sampled_from(["auto", "torch", "triton"])))


@settings(max_examples=150, deadline=None)
@given(configs())
def test_json_round_trip(c):
    text = c.to_json()
    back = AdaMoLEConfig.from_json(text)
    assert back == c
    assert back.to_json() == text
    d = c.to_dict()
    assert set(d) == set(FIELDS)
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    assert AdaMoLEConfig.from_dict(d) == c
    assert (back.scale, back.threshold_cap, back.k, back.num_experts) == (c.scale, c.threshold_cap, c.k, c.num_experts)


def test_to_dict_resolves_defaults():
    d = AdaMoLEConfig(method="lora").to_dict()
    assert d["num_experts"] == 1 and d["roles"] == ["q", "k", "v", "o"]


@pytest.mark.parametrize("extra", [{"lora_alpha": 16}, {"Rank": 4}, {"peft_type": "ADAMOLE"}])
def test_unknown_keys_rejected(extra):
    d = {**AdaMoLEConfig().to_dict(), **extra}
    key = next(iter(extra))
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        AdaMoLEConfig.from_dict(d)
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        AdaMoLEConfig.from_json(json.dumps(d))


def test_from_json_rejects_invalid_values_and_text():
    with pytest.raises(ValueError, match=r"AdaMoLEConfig\.rank must be"):
        AdaMoLEConfig.from_json(json.dumps({"rank": 0}))
    with pytest.raises(ValueError, match="not valid JSON"):
        AdaMoLEConfig.from_json("{rank: 4")
    with pytest.raises(ValueError, match="needs a dict"):
        AdaMoLEConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="needs a dict"):
        AdaMoLEConfig.from_dict("rank=4")  # type: ignore[arg-type]


def test_from_dict_partial_uses_defaults():
    assert AdaMoLEConfig.from_dict({"method": "mole", "top_k": 3}) == AdaMoLEConfig(method="mole", top_k=3)
    assert AdaMoLEConfig.from_dict({}) == AdaMoLEConfig()
