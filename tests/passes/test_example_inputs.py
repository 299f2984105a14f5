"""The caller's own example inputs (`example_inputs=`) find what synthesised ones find.

- A Hugging Face model given a dict without `use_cache`: its blocks got the cache object the forward made, which
  does not export. T5's decoder was split into pieces holding no attention and got no adapters, silently (8 of 24
  targets); a Llama raised CaptureError naming a DynamicCache. `capture.example_args` adds use_cache=False where
  the forward takes it and the inputs do not say.
- Qwen2-VL's images are one tensor of every image's patches: the example inputs cut to one row disagreed (the
  grid of one image, the patches of all), and no projection's rows could be told, the language model's included,
  so mixed batches raised. `find_rows` then takes the rows from synthesised inputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf

import amole_compile as ac
from amole_compile.passes.capture import example_args

from models import build, ids

ATTN = ac.AdaMoLEConfig(num_experts=2, rank=2)


def _t5():
    cfg = tf.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_a_dict_without_use_cache_finds_what_synthesised_inputs_find(arch):
    model = _t5() if arch == "t5" else build("llama")
    x = ids()
    given = {"input_ids": x, "decoder_input_ids": x[:, :5]} if arch == "t5" else {"input_ids": x}
    want = ac.plan(model, ATTN).targets
    assert len(want) == (24 if arch == "t5" else 8)
    assert ac.plan(model, ATTN, example_inputs=given).targets == want
    if arch == "llama":  # positional: use_cache not reached, added
        assert ac.plan(model, ATTN, example_inputs=(x,)).targets == want


def test_use_cache_is_added_only_where_unsaid():
    model = build("llama")
    x = ids()
    assert example_args(model, {"input_ids": x})[1]["use_cache"] is False
    assert example_args(model, {"input_ids": x, "use_cache": True})[1]["use_cache"] is True  # the caller's word
    assert example_args(model, (x,))[1] == {"use_cache": False}

    class Plain(torch.nn.Module):  # no use_cache parameter, no config: nothing added
        def forward(self, x, **kwargs):
            return x

    assert example_args(Plain(), (x,)) == ((x,), {})


IMG = 120


def _qwen2_vl():
    cfg = tf.AutoConfig.for_model(
        "qwen2_vl", image_token_id=IMG, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2))
    torch.manual_seed(0)
    return tf.Qwen2VLForConditionalGeneration(cfg).eval()


def _images(batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 100, (batch, 6), generator=g)
    x = torch.cat([torch.tensor([[122] + [IMG] * 4 + [123]] * batch), text], 1)  # [B, 12]
    return dict(input_ids=x, pixel_values=torch.randn(batch * 16, 96, generator=g),  # every image's patches
                image_grid_thw=torch.tensor([[1, 4, 4]] * batch), mm_token_type_ids=(x == IMG).int())


def test_rows_of_a_model_whose_images_are_one_tensor():
    model, inputs = _qwen2_vl(), _images(3)
    for name in ("default", "b"):
        ac.transform(model, ATTN, adapter_name=name, example_inputs=inputs)
        for n, p in model.named_parameters():
            if "lora_B" in n and f".{name}." in n:
                torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad(), ac.batch_adapters(model, ["b", "default", None]):
        mixed = model(**inputs).logits
    for row, name in enumerate(["b", "default", None]):
        ac.set_active_adapter(model, name)
        with torch.no_grad():
            alone = model(**inputs).logits
        torch.testing.assert_close(mixed[row], alone[row], rtol=0, atol=1e-5)


def test_attention_that_does_not_export_is_named_in_a_warning():
    """Qwen2-VL's vision attention splits by `cu_seqlens` (a size that depends on values) and does not export: its
    qkv and proj get no adapters, which only the plan's description said. Now a warning names it (and the
    language model is adapted as before)."""
    model = _qwen2_vl()
    with pytest.warns(UserWarning, match=r"2 module\(s\) of Qwen2VLForConditionalGeneration did not export for "
                                         r"analysis \(GuardOnDataDependentSymNode\), so the projections inside get no "
                                         r"adapters: model\.visual\.blocks\.0\.attn, model\.visual\.blocks\.1\.attn$"):
        plan = ac.plan(model, ATTN, example_inputs=_images(3))
    assert len(plan.targets) == 8 and all(t.module.startswith("model.language_model.") for t in plan.targets)


@pytest.mark.parametrize("name", ["mixtral_moe", "dbrx_moe", "qwen3_moe"])
def test_an_moe_block_that_does_not_export_is_not_named(name):
    """An MoE block's expert dispatch does not export either; it holds one projection of its own (the router),
    which is never adapted: no warning."""
    from models import build_matrix

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        targets = ac.plan(build_matrix(name), ATTN).targets  # (DBRX's whole blocks split, its fused Wqkv)
    assert len(targets) == (4 if name == "dbrx_moe" else 8)
