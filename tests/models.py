"""Tiny random Hugging Face models built from config, one per architecture family we support."""

from __future__ import annotations

import logging

import torch
import transformers as tf

logging.getLogger("transformers").setLevel(logging.ERROR)
VOCAB = 128

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON, num_key_value_heads=2),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: tf.MistralConfig(**_COMMON, num_key_value_heads=2),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_COMMON),
    "phi3": lambda: tf.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=64),
    "bert": lambda: tf.BertConfig(**_COMMON),
}
ARCHS = tuple(CONFIGS)
FUSED = {"gpt2": "contiguous", "phi3": "contiguous", "gpt_neox": "interleaved"}
ENCODERS = {"bert"}


def build(arch: str, attn_implementation: str = "sdpa", **overrides) -> torch.nn.Module:
    """A tiny model in eval mode; causal LMs get their LM head, encoders their masked-LM head."""
    cfg = CONFIGS[arch]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = attn_implementation
    cls = tf.AutoModelForMaskedLM if arch in ENCODERS else tf.AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def logits(model, input_ids, **kw) -> torch.Tensor:
    return model(input_ids=input_ids, **kw).logits


def tokenizer(words: int = VOCAB - 3):
    """A word-level tokenizer built locally (`tokenizers`, no download): <pad>=0, <eos>=1, <unk>=2, then w0, w1..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": 3 + i for i in range(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
