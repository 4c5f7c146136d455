"""Cross-check against HF transformers' GGUF loader (an independent reader and dequantizer).

Tier ``crosscheck``: needs the ``crosscheck`` extra (torch, transformers, accelerate).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_PRESETS

from phi3ref import GGUFFile, Phi3Config

pytestmark = pytest.mark.crosscheck
transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")
pytest.importorskip("accelerate")

# transformers' phi3 GGUF loader maps these hyperparameters (integrations/ggml.py); it does
# not read rope.dimension_count (partial rotary), the LongRoPE keys and factors, or the
# sliding window, so configs of Phi-3.5 / Phi-4-mini files come out incomplete there.
MAPPED = {
    "n_vocab": "vocab_size",
    "n_ctx_train": "max_position_embeddings",
    "n_embd": "hidden_size",
    "n_ff": "intermediate_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_head_kv": "num_key_value_heads",
    "rms_eps": "rms_norm_eps",
    "tied_embeddings": "tie_word_embeddings",
}

# GGUF tensor -> transformers parameter (Phi3ForCausalLM keeps Phi-3's fused projections)
PARAMS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
}


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_config_matches_transformers(preset, tiny_model):
    path = tiny_model(preset, "Q4_K_M")
    hf = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert hf.model_type == "phi3"
    with GGUFFile(path) as gf:
        ours = Phi3Config.from_gguf(gf)
    for field, hf_field in MAPPED.items():
        assert getattr(ours, field) == pytest.approx(getattr(hf, hf_field)), field
    hf_theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", getattr(hf, "rope_theta", None))
    assert ours.rope_base == hf_theta
    assert ours.head_dim == hf.hidden_size // hf.num_attention_heads


@pytest.mark.parametrize(
    "preset,quant",
    [(p, "Q4_K_M") for p in ALL_PRESETS] + [("phi3-mini", q) for q in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q6_K")],
)
def test_weights_match_transformers(preset, quant, tiny_model):
    """transformers reads the file with gguf-py and dequantizes every tensor; the weights it
    ends up with must be bit-identical to phi3ref's decoding of the same tensors."""
    import torch

    path = tiny_model(preset, quant)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    with GGUFFile(path) as gf:
        config = Phi3Config.from_gguf(gf)
        pairs = [(g.format(i=i), h.format(i=i)) for g, h in PARAMS.items() for i in range(config.n_layer) if "{i}" in g]
        pairs += [(g, h) for g, h in PARAMS.items() if "{i}" not in g]
        pairs.append(("token_embd.weight" if config.tied_embeddings else "output.weight", "lm_head.weight"))
        for gguf_name, hf_name in pairs:
            ours = gf.dequantize_tensor(gguf_name)
            theirs = state[hf_name]
            assert ours.shape == theirs.shape, gguf_name
            assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), f"{gguf_name} differs from {hf_name}"
