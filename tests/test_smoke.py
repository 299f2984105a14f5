import amole_compile as ac

from models import build, ids, logits


def test_transform_keeps_output_at_init(arch):
    model = build(arch)
    x = ids()
    ref = logits(model, x)
    ac.transform(model, ac.AdaMoLEConfig())
    assert (logits(model, x) - ref).abs().max().item() == 0.0
    roles = sorted(r for t in ac.targets(model) for r in t.roles)
    assert roles == sorted("qkvo" * 2)
