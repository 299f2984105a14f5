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


class LMData(torch.utils.data.Dataset):
    """A tiny in-memory causal-LM dataset: n fixed sequences of `seq` tokens, labels = input_ids."""

    def __init__(self, n: int = 8, seq: int = 10) -> None:
        self.x = ids(n, seq, seed=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def logits(model, input_ids, **kw) -> torch.Tensor:
    return model(input_ids=input_ids, **kw).logits


def tokenizer(words: int = VOCAB - 3):
    """A word-level tokenizer built locally (`tokenizers`, no download): <pad>=0, <eos>=1, <unk>=2, then w0, w1..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": 3 + i for i in range(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")



BPE_WORDS = "the quick brown fox jumps over the lazy dog a mixture of lora experts routes every token".split()


def bpe_tokenizer(vocab: int = 320):
    """A byte-level BPE tokenizer trained locally on a few sentences: <pad>=0, <s>=1, </s>=2. onnxruntime-genai's
    tokenizer reads BPE tokenizer.json files; it encodes every word of a WordLevel one as -1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(BPE_WORDS[i:] + BPE_WORDS[:i]) for i in range(len(BPE_WORDS))], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")

# ---- the architecture matrix: tiny configs (2 layers, width 64, 4 heads) of current transformers families ------

_C = dict(_COMMON, max_position_embeddings=64)
_MOE = dict(num_experts_per_tok=2)


def _dbrx():
    cfg = tf.DbrxConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4,
                        attn_config={"clip_qkv": 2.0, "kv_n_heads": 2},
                        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg.attn_config.rope_theta = 10000.0  # transformers 5.24's DbrxAttention still reads it there
    return cfg


def _vision(**kw):
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                patch_size=8, **kw)


MATRIX = {  # name -> (config factory, attention implementation); what each one exercises in a comment
    "llama": (lambda: tf.LlamaConfig(**_C, num_key_value_heads=2), "sdpa"),  # GQA
    "mistral_sliding": (lambda: tf.MistralConfig(**_C, num_key_value_heads=2, sliding_window=4), "sdpa"),
    "qwen3": (lambda: tf.Qwen3Config(**_C, num_key_value_heads=2, head_dim=16), "sdpa"),  # q/k norms
    "olmo_clip_qkv": (lambda: tf.OlmoConfig(**_C, clip_qkv=2.0), "sdpa"),  # clamp_
    "olmo2": (lambda: tf.Olmo2Config(**_C), "sdpa"),
    "gemma2_softcap": (lambda: tf.Gemma2Config(**_C, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                               attn_logit_softcapping=50.0), "eager"),  # tanh soft-capping
    "cohere": (lambda: tf.CohereConfig(**_C, num_key_value_heads=2), "sdpa"),
    "starcoder2": (lambda: tf.Starcoder2Config(**_C, num_key_value_heads=2), "sdpa"),
    "stablelm": (lambda: tf.StableLmConfig(**_C, num_key_value_heads=2), "sdpa"),  # partial rotary
    "phi": (lambda: tf.PhiConfig(**_C), "sdpa"),
    "gptj": (lambda: tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8), "sdpa"),
    "codegen": (lambda: tf.CodeGenConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
                "sdpa"),  # qkv in blocks of (q, v, k)
    "gpt_bigcode_mqa": (lambda: tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                    multi_query=True), "sdpa"),  # uneven q | k | v split
    "falcon_mqa": (lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, multi_query=True), "sdpa"),  # x @ W.T
    "falcon_grouped": (lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, new_decoder_architecture=True,
                                               num_kv_heads=2), "sdpa"),  # grouped per kv head
    "bloom": (lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4), "eager"),
    "mpt_clip_qkv": (lambda: tf.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4,
                                          attn_config={"clip_qkv": 2.0}), "eager"),
    "dbrx_moe": (_dbrx, "sdpa"),  # data-dependent expert dispatch: block-by-block capture
    "mixtral_moe": (lambda: tf.MixtralConfig(**_C, num_key_value_heads=2, num_local_experts=4, **_MOE), "sdpa"),
    "qwen3_moe": (lambda: tf.Qwen3MoeConfig(**_C, num_key_value_heads=2, head_dim=16, num_experts=4,
                                            moe_intermediate_size=32, **_MOE), "sdpa"),
    "qwen3_next_gated": (lambda: tf.Qwen3NextConfig(**_C, num_key_value_heads=2, head_dim=16,
                                                    layer_types=["full_attention"] * 2, num_experts=4,
                                                    moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                    **_MOE), "sdpa"),
    "gpt_oss_sinks": (lambda: tf.GptOssConfig(**_C, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                              **_MOE), "eager"),
    "llama4_text": (lambda: tf.Llama4TextConfig(**_C, intermediate_size_mlp=128, num_key_value_heads=2,
                                                head_dim=16, num_local_experts=2), "sdpa"),
    "deepseek_v2_mla": (lambda: tf.DeepseekV2Config(**_C, num_key_value_heads=4, q_lora_rank=None,
                                                    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                    v_head_dim=12, n_routed_experts=4, moe_intermediate_size=32,
                                                    first_k_dense_replace=1, **_MOE), "sdpa"),
    "deepseek_v3_mla": (lambda: tf.DeepseekV3Config(**_C, num_key_value_heads=4, q_lora_rank=24,
                                                    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                    v_head_dim=12, n_routed_experts=4, moe_intermediate_size=32,
                                                    first_k_dense_replace=1, n_group=1, topk_group=1, **_MOE),
                        "eager"),
    "roberta": (lambda: tf.RobertaConfig(**_C), "sdpa"),
    "electra": (lambda: tf.ElectraConfig(**_C, embedding_size=32), "sdpa"),
    "distilbert": (lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
                   "sdpa"),
    "albert_shared": (lambda: tf.AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
                      "sdpa"),  # one layer's parameters shared by both layers
    "deberta_v2": (lambda: tf.DebertaV2Config(**_C, relative_attention=True, pos_att_type=["c2p", "p2c"],
                                              max_relative_positions=32, position_buckets=16), "eager"),
    "t5": (lambda: tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
           "sdpa"),
    "bart": (lambda: tf.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                   decoder_ffn_dim=128, max_position_embeddings=64), "sdpa"),
    "whisper": (lambda: tf.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                         decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16,
                                         max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                         decoder_start_token_id=1), "sdpa"),
    "vit": (lambda: tf.ViTConfig(**_vision()), "sdpa"),
    "clip": (lambda: tf.CLIPConfig(text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=4),
                                   vision_config=_vision()), "sdpa"),  # two towers
}


def build_matrix(name: str) -> torch.nn.Module:
    """A tiny base model (no head) of one matrix architecture, in eval mode."""
    make, attn = MATRIX[name]
    cfg = make()
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
        if c is not None:
            c._attn_implementation = attn
    torch.manual_seed(0)
    return tf.AutoModel.from_config(cfg).eval()


def seal(folder) -> None:
    """Point `amole_config.json`'s `weights` entry (file, size, sha256) at the `adapters.safetensors` now in
    `folder`: for tests that edit the weights by hand (a weights file that does not match is refused on load)."""
    import hashlib
    import json
    from pathlib import Path

    config, weights = Path(folder) / "amole_config.json", Path(folder) / "adapters.safetensors"
    meta = json.loads(config.read_text())
    data = weights.read_bytes()
    meta["weights"] = {"file": weights.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    config.write_text(json.dumps(meta, indent=2))
