"""The README's flows, run as written: a narrowed plan is saved as what it carried out and reloads onto a fresh
base; `inspect --roles` counts what it selected."""

from __future__ import annotations

import torch

import amole_compile as ac

from models import build, ids, logits


def test_a_narrowed_plan_saves_what_it_carried_out_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    base = build("llama")
    plan = ac.plan(base, ac.AdaMoLEConfig())
    model = ac.transform(base, ac.AdaMoLEConfig(), plan=plan.filter(roles=("q", "v")))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    config = ac.model.state.adapter_groups(model)[0][1].config
    assert config.roles == ("q", "v")  # the config says what the plan carried out
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ac.load_adapters(fresh, tmp_path)
    assert [(t.module, t.roles) for t in ac.targets(fresh)] == [(t.module, t.roles) for t in ac.targets(model)]
    x = ids(2, 8)
    torch.testing.assert_close(logits(fresh, x), logits(model.eval(), x), rtol=0, atol=0)


def test_a_plan_narrowed_by_module_reloads_those_modules_only(tmp_path):
    base = build("gpt2")  # fused c_attn: roles q, k, v in one projection
    plan = ac.plan(base, ac.AdaMoLEConfig()).filter(roles=("q", "o"), modules=lambda m: ".0." in m)
    model = ac.transform(base, ac.AdaMoLEConfig(), plan=plan)
    ac.save_adapters(model, tmp_path)
    fresh = ac.load_adapters(build("gpt2"), tmp_path)
    assert [(t.module, t.roles) for t in ac.targets(fresh)] == [(t.module, t.roles) for t in plan.targets]


def test_inspect_counts_the_roles_it_selected(tmp_path, capsys):
    from amole_compile.cli import main

    build("llama").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--roles", "q"]) == 0
    out = capsys.readouterr().out
    assert "2 projection(s), 2 role site(s) selected" in out and "(of 8 found)" in out
