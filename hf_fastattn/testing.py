"""Tiny configs of every supported model family (no weights needed) and model-comparison helpers.

Used by the test suite, the demo and the model cards. Each config has 2 layers, GQA where the family has
it and, where the family has one, a sliding (or chunked) layer with a window (chunk) shorter than the test
sequences (8).
"""

from __future__ import annotations

import copy

import torch

FAMILIES = ("llama", "gemma", "gemma2", "gemma3", "mistral", "qwen2", "qwen3", "gpt_oss", "llama4", "deepseek_v3",
            "phi3", "olmo2", "granite", "cohere2", "smollm3", "qwen2_moe", "phimoe")
WINDOW = 8


def tiny_config(family: str, **overrides):
    """A 2-layer config of `family` (hidden 64, 4 query heads, 2 KV heads where the family has GQA)."""
    import transformers as tf

    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.1,  # peaked enough that a wrong mask moves the logits by O(1)
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    sliding_pair = ["sliding_attention", "full_attention"]
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**common)
    elif family == "gemma2":
        # softcap 1.0 is below the attention logits of this init: the cap is active
        cfg = tf.Gemma2Config(**common, sliding_window=WINDOW, layer_types=sliding_pair,
                              attn_logit_softcapping=1.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, sliding_window=WINDOW, layer_types=sliding_pair, query_pre_attn_scalar=16)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=WINDOW)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, layer_types=sliding_pair)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, use_sliding_window=True, sliding_window=WINDOW, layer_types=sliding_pair)
    elif family == "gpt_oss":  # attention sinks (s_aux) on every layer, sliding and full layers alternating
        cfg = tf.GptOssConfig(**common, sliding_window=WINDOW, layer_types=sliding_pair, num_local_experts=4,
                              num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    elif family == "llama4":  # text model: a chunked RoPE layer, then a full NoPE layer with temperature tuning
        cfg = tf.Llama4TextConfig(**common, intermediate_size_mlp=128, attention_chunk_size=WINDOW,
                                  no_rope_layers=[1, 0], floor_scale=4, num_local_experts=2)
    elif family == "deepseek_v3":  # multi-head latent attention: q/k heads of 16 + 8 (RoPE part), values of 12
        mla = {k: v for k, v in common.items() if k != "head_dim"} | {"num_key_value_heads": 4}
        cfg = tf.DeepseekV3Config(**mla, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                  v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                  moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1)
    elif family == "phi3":  # fused qkv projection (full layers: Mistral covers a window on every layer)
        cfg = tf.Phi3Config(**common, sliding_window=None)
    elif family == "olmo2":  # q/k RMSNorm over all heads together
        cfg = tf.Olmo2Config(**common)
    elif family == "granite":  # attention_multiplier replaces 1/sqrt(d)
        cfg = tf.GraniteConfig(**common, attention_multiplier=0.05, embedding_multiplier=2.0, residual_multiplier=0.5,
                               logits_scaling=2.0)
    elif family == "cohere2":  # sliding RoPE layers and full NoPE layers, parallel attention + MLP
        cfg = tf.Cohere2Config(**common, sliding_window=WINDOW, layer_types=sliding_pair, logit_scale=1.0)
    elif family == "smollm3":  # a NoPE layer
        cfg = tf.SmolLM3Config(**common, no_rope_layers=[1, 0], sliding_window=None)
    elif family == "qwen2_moe":  # the window is in the mask only: the attention call gets no sliding_window=
        cfg = tf.Qwen2MoeConfig(**common, use_sliding_window=True, sliding_window=WINDOW, layer_types=sliding_pair,
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32)
    elif family == "phimoe":  # a window on every layer, in the mask only
        cfg = tf.PhimoeConfig(**common, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                              router_jitter_noise=0.0)  # jitter is training-only noise: a checkpointed twin differs
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def model_pair(config, attn: str = "fastattn", reference: str = "eager", seed: int = 0, dtype=torch.float32):
    """Two models with identical weights: (reference, under test). Each gets its own config copy, since
    `from_config(..., attn_implementation=...)` mutates the config it is given."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference, dtype=dtype)
    with torch.no_grad():  # attention sinks start near 0 (std initializer_range); at O(1) a dropped sink shows
        for name, p in ref.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 2.0)
    new = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn, dtype=dtype)
    new.load_state_dict(ref.state_dict())
    return ref.eval(), new.eval()


def cached_forward(model, input_ids, cache):
    """model(input_ids) appending to `cache`, checked to have been used. transformers renamed the forward's cache
    argument (past_key_values -> cache, between 5.17 and 5.24) and silently drops a keyword it does not know:
    under the other name a "decode" step would be a fresh forward of the new tokens alone."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    before = cache.get_seq_length()
    out = model(input_ids=input_ids, use_cache=True, **{name: cache})
    if cache.get_seq_length() != before + input_ids.shape[1]:
        raise RuntimeError(f"the cache was not used: {before} -> {cache.get_seq_length()} slots after "
                           f"{input_ids.shape[1]} tokens")
    return out


def shrink_logits(model, factor: float) -> None:
    """Scale every attention logit by factor**2, through each attention module's `scaling` (which transformers
    passes to the attention function), so it works alike for separate, fused (Phi-3) and latent (DeepSeek) q/k
    projections and for q/k norms."""
    layers = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not layers or not all(isinstance(getattr(m, "scaling", None), float) for m in layers):
        raise ValueError(f"{type(model).__name__}: no attention modules with a float `scaling` to shrink")
    for m in layers:
        m.scaling *= factor**2


def packing_error(model, lengths, seed: int = 0, flash_kwargs: bool = True) -> float:
    """Largest |logit| difference between sequences packed with `DataCollatorWithFlattening` and the same
    sequences run one by one (0 up to rounding when nothing crosses a boundary)."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits[0]
        worst, start = 0.0, 0
        for s in seqs:
            alone = model(input_ids=torch.tensor([s])).logits[0]
            worst = max(worst, (alone - packed[start : start + len(s)]).abs().max().item())
            start += len(s)
    return worst


class LargestTensor:
    """Context manager recording the largest tensor (in elements) any torch op produces inside it: tests use
    it to assert memory structure (no N x N or N x r intermediate)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor):
                        outer.largest = max(outer.largest, t.numel())
                return out

        self.largest = 0
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False
