"""Export a transformed model to ONNX (scoring and KV-cache decoding graphs) and serve it with onnxruntime.

    python examples/export_and_serve.py [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import amole_compile as ac


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for the .onnx files (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="amole_onnx_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = ac.transform(AutoModelForCausalLM.from_config(cfg), ac.AdaMoLEConfig())
    with torch.no_grad():  # stand-in for training: adapters that change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    scoring = ac.export_onnx(model, out / "model.onnx")
    decoder = ac.export_onnx(model, out / "decoder.onnx", kv_cache=True)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    got = torch.from_numpy(ac.OnnxLM(scoring).logits(ids.numpy()))
    print(f"{scoring}: max |onnxruntime - PyTorch| = {(got - want).abs().max().item():.2e}")
    lm = ac.OnnxLM(decoder)
    tokens = lm.generate(ids[:1, :8].numpy(), max_new_tokens=8)
    ref = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"{decoder}: OnnxLM greedy {tokens[0, 8:].tolist()} | PyTorch {ref[0, 8:].tolist()}")


if __name__ == "__main__":
    main()
