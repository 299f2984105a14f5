"""`export_onnx(model, out_dir, genai=True)`: a folder onnxruntime-genai serves, with adapters as named graph
inputs and one `.onnx_adapter` each; its greedy tokens equal PyTorch `generate` for every adapter and for none."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch

og = pytest.importorskip("onnxruntime_genai")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import amole_compile as ac  # noqa: E402
from amole_compile import cli, folders  # noqa: E402
from amole_compile.export import genai  # noqa: E402
from amole_compile.model.modules import ExpertSet  # noqa: E402
from amole_compile.model.state import adapter_state  # noqa: E402

from models import bpe_tokenizer, build  # noqa: E402
from onnx_helpers import randomise  # noqa: E402

TEXTS = ["the lazy fox", "a mixture of lora experts routes every token over the dog"]
NEW = 10


def _base(tok, layers: int = 2):
    torch.manual_seed(0)
    return build("llama", vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 num_hidden_layers=layers)


def _weights(model, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state(model, [name]).items()}


def _named(model, name: str, seed: int, cfg=None):
    """Add adapter `name` with nonzero B and a stronger router (onnx_helpers.randomise on its sites only)."""
    ac.transform(model, cfg or ac.AdaMoLEConfig(), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, site in model.named_modules():
            if f".adapters.{name}." in f"{n}." and isinstance(site, ExpertSet):
                site.lora_B.copy_(torch.randn(site.lora_B.shape, generator=g) * 0.05)
                site.gate.mul_(3.0)
                site.threshold_weight.mul_(3.0)
    return model


def _with(model, name):
    """The model running adapter `name`."""
    ac.set_active_adapter(model, name)
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A llama with adapters "a" and "b" (same sites and shapes, own weights; b's alpha 4x a's) exported for genai
    in one call with a tokenizer object, then adapter "c" (alpha a quarter of a's), added to the model later, added
    to the folder with `add_adapter`. The graph bakes in a's scale: b's and c's are folded into their B."""
    tok = bpe_tokenizer()
    base = _base(tok)
    model = _named(_named(copy.deepcopy(base), "a", 0), "b", 1, ac.AdaMoLEConfig(alpha=64.0))
    out = tmp_path_factory.mktemp("genai") / "served"
    path = ac.export_onnx(model, out, genai=True, adapters=["a", "b"], tokenizer=tok)
    genai.add_adapter(_named(model, "c", 2, ac.AdaMoLEConfig(alpha=4.0)), out, "c")
    weights = {name: _weights(model, name) for name in "abc"}
    return types.SimpleNamespace(tok=tok, base=base, model=model, out=out, path=path, weights=weights,
                                 folds={"a": 1.0, "b": 4.0, "c": 0.25})


def _og_greedy(out, ids: np.ndarray, adapter: str | None = None) -> list[list[int]]:
    """onnxruntime-genai's greedy sequences (prompt included, NEW tokens more) for int32 ids [B, S]."""
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + NEW, do_sample=False, batch_size=ids.shape[0])
    gen = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(out / f"{adapter}.onnx_adapter"), adapter)
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [[int(t) for t in gen.get_sequence(i)] for i in range(ids.shape[0])]


def _genai_generate(out, adapter: str | None) -> list[list[int]]:
    """Greedy continuations of TEXTS, batched as og.Tokenizer.encode_batch pads them (right, with pad)."""
    ids = og.Tokenizer(og.Model(str(out))).encode_batch(TEXTS).as_numpy()
    return [row[ids.shape[1]:] for row in _og_greedy(out, ids, adapter)]


def _torch_generate(model, tok) -> list[list[int]]:
    tok.padding_side = "left"
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.slow
def test_folder_and_config(served):
    names = sorted(p.name for p in served.out.iterdir())
    assert served.path == served.out.absolute()
    assert {"model.onnx", "genai_config.json", "a.onnx_adapter", "b.onnx_adapter", "c.onnx_adapter", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    assert not [p for p in served.out.parent.iterdir() if p.name.startswith(".")], "temp folder left behind"
    cfg, hf = json.loads((served.out / "genai_config.json").read_text()), served.model.config
    m, dec = cfg["model"], cfg["model"]["decoder"]
    assert (m["type"], m["vocab_size"], m["context_length"]) == ("llama", len(served.tok), hf.max_position_embeddings)
    assert (m["bos_token_id"], m["eos_token_id"], m["pad_token_id"]) == (1, 2, 0)
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (2, 4, 2, 16, 64)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert cfg["search"]["past_present_share_buffer"] is False and cfg["search"]["do_sample"] is False


@pytest.mark.slow
def test_adapter_tensors_are_named_inputs_with_zero_defaults(served):
    graph = onnx.load(str(served.out / "model.onnx")).graph
    inputs = {i.name for i in graph.input if i.name.startswith("amole.")}
    want = {genai.input_name(k) for k in served.weights["a"]}
    assert inputs == want and len(want) == 40  # 2 layers x q,k,v,o x (A, B, gate, threshold w, b)
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name in inputs}
    assert set(defaults) == inputs and all(not d.any() for d in defaults.values())
    for name, weights in served.weights.items():
        stored = _stored(served, name)
        assert set(stored) == inputs
        for key, w in weights.items():  # B carries the adapter's scale over the graph's
            want = w * served.folds[name] if key.endswith("lora_B") else w
            np.testing.assert_array_equal(stored[genai.input_name(key)], want.numpy())


def _stored(served, name: str) -> dict[str, np.ndarray]:
    """Adapter `name`'s tensors as its `.onnx_adapter` file holds them, by graph input name."""
    fmt = ort.AdapterFormat.read_adapter(str(served.out / f"{name}.onnx_adapter"))
    params = fmt.get_parameters()
    return {k: v.numpy().copy() for k, v in params.items()}  # (the arrays view memory the format object owns)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["a", "b", "c", None])
def test_logits_equal_pytorch_for_every_adapter(served, adapter):
    """model.onnx fed each adapter's file (b and c with scales other than the graph's) gives PyTorch's logits with
    that adapter active, and fed nothing the base model's: to float noise, far below the adapters' effect."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(served.out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ids = torch.randint(3, len(served.tok), (2, 7), generator=torch.Generator().manual_seed(5))
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 7), np.int64),
            "position_ids": np.tile(np.arange(7), (2, 1))}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
    feed.update(_stored(served, adapter) if adapter else {})
    got = torch.from_numpy(session.run(["logits"], feed)[0])
    with torch.no_grad():
        want = (_with(served.model, adapter) if adapter else served.base)(input_ids=ids).logits
        effect = (want - served.base(input_ids=ids).logits).abs().max()
    assert adapter is None or effect > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["a", "b", "c", None])
def test_greedy_tokens_equal_pytorch(served, adapter):
    """Each adapter (and no adapter: the base model) in a batch of prompts of different lengths."""
    ref = _torch_generate(_with(served.model, adapter) if adapter else served.base, served.tok)
    assert _genai_generate(served.out, adapter) == ref


@pytest.mark.slow
def test_adapters_change_the_tokens(served):
    runs = [_torch_generate(_with(served.model, n), served.tok) for n in "abc"]
    runs.append(_torch_generate(served.base, served.tok))
    assert all(runs[i] != runs[j] for i in range(4) for j in range(i))


@pytest.mark.slow
def test_add_adapter_refuses_other_shapes_and_settings(served):
    other = ac.transform(copy.deepcopy(served.base), ac.AdaMoLEConfig(rank=2))
    with pytest.raises(ValueError, match=r"adapter 'd' does not fit .*amole\.model\.layers"):
        genai.add_adapter(other, served.out, "d")
    capped = ac.transform(copy.deepcopy(served.base), ac.AdaMoLEConfig(max_threshold=0.5))
    with pytest.raises(ValueError, match=r"adapter 'd' cannot be served by .*model\.onnx: its max_threshold at "
                                         r"amole\.model\.layers\.0\.self_attn\.q_proj\.q is 0\.5, the graph's"):
        genai.add_adapter(capped, served.out, "d")
    assert not (served.out / "d.onnx_adapter").exists()


def test_add_adapter_refuses_a_graph_that_keeps_no_settings(tmp_path):
    """A folder exported before graphs kept their adapter settings: add_adapter cannot check them, and refuses."""
    x = onnx.helper.make_tensor_value_info("amole.m.q.lora_A", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["amole.m.q.lora_A"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "model.onnx")
    model = ac.transform(build("llama", num_hidden_layers=1), ac.AdaMoLEConfig())
    with pytest.raises(ValueError, match="does not say which adapter settings it bakes in"):
        genai.add_adapter(model, tmp_path, "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_bad_genai_arguments(tmp_path):
    model = ac.transform(build("llama", num_hidden_layers=1), ac.AdaMoLEConfig())
    with pytest.raises(ValueError, match="tokenizer= needs genai=True"):
        ac.export_onnx(model, tmp_path / "m.onnx", tokenizer=bpe_tokenizer())
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['a'\]; the model has \['default'\]"):
        ac.export_onnx(model, tmp_path / "g", genai=True, adapters=["a"])
    with pytest.raises(ValueError, match="no AdaMoLE adapters"):
        ac.export_onnx(build("llama", num_hidden_layers=1), tmp_path / "g", genai=True, adapters=["a"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no genai_config.json"):
        ac.export_onnx(model, tmp_path / "taken", genai=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_tokenizer_files_come_from_the_model_directory(tmp_path, recwarn):
    """tokenizer=None: the files of the directory the model was loaded from are copied, without a warning."""
    src, out = tmp_path / "model_dir", tmp_path / "out"
    src.mkdir(), out.mkdir()
    bpe_tokenizer().save_pretrained(src)
    model = build("llama", num_hidden_layers=1)
    model.name_or_path = str(src)
    genai._copy_tokenizer(genai._model_dir(model), out, tmp_path / "served")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert "tokenizer.json" in {p.name for p in out.iterdir()}
    assert not [w for w in recwarn if issubclass(w.category, genai.MissingTokenizerWarning)]


def test_an_earlier_export_is_replaced_whole(tmp_path):
    dest, tmp = tmp_path / "served", tmp_path / ".served.tmp"
    dest.mkdir(), tmp.mkdir()
    (dest / "genai_config.json").write_text("{}")
    (dest / "old.onnx_adapter").write_text("old")
    (tmp / "genai_config.json").write_text('{"new": 1}')
    assert genai.check_out_dir(dest) == dest
    folders.move_folder(tmp, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["served"]
    assert [p.name for p in dest.iterdir()] == ["genai_config.json"]
    assert "new" in (dest / "genai_config.json").read_text()


def test_adapter_weights_of_named_adapters():
    """Each name gets its own weights, unknown names are refused with the known ones, the active adapter stays."""
    model = _named(_named(build("llama", num_hidden_layers=1), "a", 0), "b", 1)
    ac.set_active_adapter(model, "a")
    found = genai.adapter_weights(model, ["a", "b"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]; the model has \['a', 'b'\]"):
        genai.adapter_weights(model, ["a", "c"])
    for name in ("a", "b"):
        assert found[name].keys() == _weights(model, name).keys()
        assert all(torch.equal(v, _weights(model, name)[k]) for k, v in found[name].items())
    assert ac.active_adapter(model) == "a"
    with pytest.raises(ValueError, match="usable as file names"):
        genai.adapter_weights(model, ["a/b"])
    ac.transform(model, ac.AdaMoLEConfig(rank=2), adapter_name="small")
    with pytest.raises(ValueError, match=r"'a' and 'small' cannot share one graph: amole\.model\.layers\.0"):
        genai.adapter_weights(model, ["a", "small"])


def test_adapter_weights_fold_the_scale_and_refuse_other_settings():
    """One graph bakes in the first adapter's settings: another adapter's scale (alpha / rank) is folded into its
    B (and only its B); a threshold cap, top-k or method of its own is refused, naming the site and the setting."""
    model = _named(_named(build("llama", num_hidden_layers=1), "a", 0), "b", 1, ac.AdaMoLEConfig(alpha=40.0))
    found = genai.adapter_weights(model, ["a", "b"])
    raw = _weights(model, "b")
    assert [k for k in raw if k.endswith("lora_B")]
    for key, w in raw.items():
        torch.testing.assert_close(found["b"][key], w * 2.5 if key.endswith("lora_B") else w, rtol=0, atol=0)
    assert all(torch.equal(v, _weights(model, "a")[k]) for k, v in found["a"].items())
    assert torch.equal(genai.adapter_weights(model, ["b"])["b"][next(iter(raw))], next(iter(raw.values())))
    ac.transform(model, ac.AdaMoLEConfig(max_threshold=0.5), adapter_name="capped")
    with pytest.raises(ValueError, match=r"adapter 'capped' cannot be served by the graph traced from adapter 'a': "
                                         r"its max_threshold at amole\.model\.layers\.0\.self_attn\.q_proj\.q is 0\.5"):
        genai.adapter_weights(model, ["a", "capped"])
    for name, k in (("m1", 1), ("m2", 2)):
        ac.transform(model, ac.AdaMoLEConfig(method="mole", top_k=k), adapter_name=name)
    with pytest.raises(ValueError, match=r"adapter 'm2' .*: its top_k at .* is 2, the graph's is 1"):
        genai.adapter_weights(model, ["m1", "m2"])


def test_input_names_leave_out_the_adapter_name():
    assert genai.input_name("m.layers.0.q_proj.adapters.mine.q.lora_A") == "amole.m.layers.0.q_proj.q.lora_A"


@pytest.mark.slow
def test_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    """A failure after the graph was written (here: copying the tokenizer) leaves neither the folder nor a temp."""
    model = randomise(ac.transform(_base(bpe_tokenizer(), layers=1), ac.AdaMoLEConfig()))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(genai, "_copy_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        ac.export_onnx(model, tmp_path / "out", genai=True, adapters=["default"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_genai_without_tokenizer_says_so_in_one_line(tmp_path, capsys):
    """`amole-compile export MODEL_DIR ADAPTER_DIR OUT --genai` on a model directory without tokenizer files:
    the export completes (the adapters baked in), one warning line says the tokenizer files are missing, and
    genai generates PyTorch's tokens from token ids."""
    tok = bpe_tokenizer()
    model = randomise(ac.transform(_base(tok, layers=1), ac.AdaMoLEConfig()))
    ac.untransform(copy.deepcopy(model)).save_pretrained(tmp_path / "base")
    ac.save_adapters(model, tmp_path / "adapters")
    out = tmp_path / "served"
    assert cli.main(["export", str(tmp_path / "base"), str(tmp_path / "adapters"), str(out), "--genai"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "amole-compile" in ln]
    assert len(err) == 1 and "warning" in err[0] and "no tokenizer files" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx"]
    prompt = np.array([[86, 261, 316, 309, 144, 7]], dtype=np.int32)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=NEW, do_sample=False)
    assert _og_greedy(out, prompt) == ref.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("arch,kind", [("qwen2", "qwen2"), ("gpt2", "decoder")])
def test_other_architectures(tmp_path, arch, kind):
    """Qwen2 (no bos id: left out, genai refuses null) and GPT-2 (fused QKV Conv1D, served as "decoder") with an
    adapter: genai's greedy tokens equal PyTorch's."""
    torch.manual_seed(0)
    depth = {"n_layer": 1} if arch == "gpt2" else {"num_hidden_layers": 1}
    model = randomise(ac.transform(build(arch, vocab_size=320, **depth), ac.AdaMoLEConfig()))
    out = ac.export_onnx(model, tmp_path / "served", genai=True, adapters=["default"], tokenizer=bpe_tokenizer())
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == kind
    prompt = np.array([[86, 261, 316, 309, 144]], dtype=np.int32)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert _og_greedy(out, prompt, "default") == ref.tolist()
