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
    """A llama with adapters "a" and "b" (same sites and shapes, own weights) exported for genai in one call with
    a tokenizer object, then adapter "c", added to the model later, added to the folder with `add_adapter`."""
    tok = bpe_tokenizer()
    base = _base(tok)
    model = _named(_named(copy.deepcopy(base), "a", 0), "b", 1)
    out = tmp_path_factory.mktemp("genai") / "served"
    path = ac.export_onnx(model, out, genai=True, adapters=["a", "b"], tokenizer=tok)
    genai.add_adapter(_named(model, "c", 2), out, "c")
    weights = {name: _weights(model, name) for name in "abc"}
    return types.SimpleNamespace(tok=tok, base=base, model=model, out=out, path=path, weights=weights)


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
        stored = ort.AdapterFormat.read_adapter(str(served.out / f"{name}.onnx_adapter")).get_parameters()
        assert set(stored) == inputs
        for key, w in weights.items():
            np.testing.assert_array_equal(stored[genai.input_name(key)].numpy(), w.numpy())


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
def test_add_adapter_refuses_other_shapes(served):
    other = ac.transform(copy.deepcopy(served.base), ac.AdaMoLEConfig(rank=2))
    with pytest.raises(ValueError, match=r"adapter 'd' does not fit .*amole\.model\.layers"):
        genai.add_adapter(other, served.out, "d")
    assert not (served.out / "d.onnx_adapter").exists()


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
