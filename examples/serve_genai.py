"""Train two AdaMoLE adapters on one base model, export them for onnxruntime-genai and serve both.

    python examples/serve_genai.py [--out DIR] [--steps N]

The folder holds one decoder graph whose adapter tensors are inputs, one `.onnx_adapter` per adapter, the
tokenizer and genai_config.json; onnxruntime-genai switches adapters per generator. Each sample is checked
against PyTorch `generate` with the same adapter. Needs `pip install amole-compile[genai]`.
"""

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import amole_compile as ac

TASKS = {  # adapter name -> the text it learns to continue
    "fox": "the quick brown fox jumps over the lazy dog",
    "experts": "the mixture of lora experts routes every token to the experts it needs",
}
PROMPT = "the"


def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on the task texts (no download)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(TASKS.values()) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def train(model, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """Fit the adapters (only they train) to continue `ids`; returns the first and the last loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


def serve(out: Path, names: list[str], prompt: np.ndarray, new: int) -> dict:
    """Greedy samples from onnxruntime-genai: name -> (token ids, text); None is the base model."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    adapters = og.Adapters(model)
    for name in names:
        adapters.load(str(out / f"{name}.onnx_adapter"), name)
    tok = og.Tokenizer(model)
    samples = {}
    for name in [*names, None]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False)
        gen = og.Generator(model, params)
        if name is not None:
            gen.set_active_adapter(adapters, name)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        seq = [int(t) for t in gen.get_sequence(0)]
        samples[name] = (seq, tok.decode(np.array(seq, dtype=np.int32)))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per adapter")
    args = ap.parse_args()
    out = Path(args.out or Path(tempfile.mkdtemp(prefix="amole_genai_")) / "served")
    tok = tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    model = copy.deepcopy(base)
    for name, text in TASKS.items():  # one named adapter per task on the same base; the newest one trains
        ac.transform(model, ac.AdaMoLEConfig(dropout=0.0), adapter_name=name)
        first, last = train(model, tok(text, return_tensors="pt")["input_ids"], args.steps)
        print(f"adapter {name!r}: {args.steps} steps on {text!r}, loss {first:.2f} -> {last:.2f}")
    ac.export_onnx(model, out, genai=True, adapters=list(TASKS), tokenizer=tok)  # one graph, a file per adapter
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")

    prompt = tok(PROMPT, return_tensors="np")["input_ids"].astype(np.int32)
    samples = serve(out, list(TASKS), prompt, new=14)
    for name, (seq, text) in samples.items():
        if name is not None:
            ac.set_active_adapter(model, name)
        ref = (model if name is not None else base).generate(torch.from_numpy(prompt).long(), max_new_tokens=14,
                                                             do_sample=False)
        same = seq == ref[0].tolist()[:len(seq)] and len(seq) >= 2
        print(f"[{name or 'base model'}] {text!r} (same tokens as PyTorch: {same})")


if __name__ == "__main__":
    main()
