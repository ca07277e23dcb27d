"""Header-only checkpoints of the real releases, at full size: sparse safetensors files whose headers
list every published tensor with its real name, dtype and shape, and whose data area is a hole.

DeepSeek-V4-Flash follows ../shared/releases/README.md table by table (46 shards, no `model.` prefix).
Step-3.7-Flash: the names and prefixes the README gives; the dimensions it does not list come from
mlx-vlm's step3p7 config defaults (TextConfig / VisionConfig), the published names through the
fixture generator's own inverse mapping (fixtures/family_step.py) on zero-cost broadcast views.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fmtconv.formats.safetensors_io import TensorSpec, write_header_only, write_index

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# DeepSeek-V4-Flash
# ---------------------------------------------------------------------------------------------

V4_LAYERS, V4_EXPERTS, V4_HIDDEN, V4_VOCAB, V4_SHARDS = 43, 256, 4096, 129280, 46


def v4_flash_config() -> dict:
    """config.json of DeepSeek-V4-Flash (the facts in ../shared/releases/README.md)."""
    ratios = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, V4_LAYERS)] + [0]
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16",
        "hidden_size": V4_HIDDEN, "num_hidden_layers": V4_LAYERS, "num_nextn_predict_layers": 1, "vocab_size": V4_VOCAB,
        "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
        "o_lora_rank": 1024, "o_groups": 8, "sliding_window": 128, "moe_intermediate_size": 2048, "n_routed_experts": V4_EXPERTS,
        "n_shared_experts": 1, "num_experts_per_tok": 6, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc", "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536}, "compress_ratios": ratios,
        "rms_norm_eps": 1e-6, "expert_dtype": "fp4", "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
                                "activation_scheme": "dynamic"},
    }


def _fp8(name: str, out: int, inp: int) -> list[TensorSpec]:
    return [TensorSpec(f"{name}.weight", "F8_E4M3", (out, inp)), TensorSpec(f"{name}.scale", "F8_E8M0", (-(-out // 128), -(-inp // 128)))]


def _fp4(name: str, out: int, inp: int) -> list[TensorSpec]:
    return [TensorSpec(f"{name}.weight", "I8", (out, inp // 2)), TensorSpec(f"{name}.scale", "F8_E8M0", (out, inp // 32))]


def _v4_layer(p: str, i: int, ratio: int, hash_layer: bool) -> list[TensorSpec]:
    h, inter = V4_HIDDEN, 2048
    s = _fp8(f"{p}.attn.wq_a", 1024, h) + _fp8(f"{p}.attn.wq_b", 32768, 1024) + _fp8(f"{p}.attn.wkv", 512, h)
    s += _fp8(f"{p}.attn.wo_a", 8192, 4096) + _fp8(f"{p}.attn.wo_b", h, 8192)
    s += [TensorSpec(f"{p}.attn.attn_sink", "F32", (64,)), TensorSpec(f"{p}.attn.q_norm.weight", "BF16", (1024,)),
          TensorSpec(f"{p}.attn.kv_norm.weight", "BF16", (512,)), TensorSpec(f"{p}.attn_norm.weight", "BF16", (h,)),
          TensorSpec(f"{p}.ffn_norm.weight", "BF16", (h,)), TensorSpec(f"{p}.ffn.gate.weight", "BF16", (V4_EXPERTS, h))]
    s += [TensorSpec(f"{p}.ffn.gate.tid2eid", "I64", (V4_VOCAB, 6))] if hash_layer else [TensorSpec(f"{p}.ffn.gate.bias", "F32", (V4_EXPERTS,))]
    for e in range(V4_EXPERTS):
        s += _fp4(f"{p}.ffn.experts.{e}.w1", inter, h) + _fp4(f"{p}.ffn.experts.{e}.w2", h, inter) + _fp4(f"{p}.ffn.experts.{e}.w3", inter, h)
    s += _fp8(f"{p}.ffn.shared_experts.w1", inter, h) + _fp8(f"{p}.ffn.shared_experts.w2", h, inter) + _fp8(f"{p}.ffn.shared_experts.w3", inter, h)
    for sub in ("attn", "ffn"):
        s += [TensorSpec(f"{p}.hc_{sub}_fn", "F32", (24, 4 * h)), TensorSpec(f"{p}.hc_{sub}_base", "F32", (24,)),
              TensorSpec(f"{p}.hc_{sub}_scale", "F32", (3,))]
    if ratio:
        width = 512 * (2 if ratio == 4 else 1)  # the ratio-4 compressor overlaps windows: twice head_dim
        s += [TensorSpec(f"{p}.attn.compressor.ape", "F32", (ratio, width)), TensorSpec(f"{p}.attn.compressor.wkv.weight", "BF16", (width, h)),
              TensorSpec(f"{p}.attn.compressor.wgate.weight", "BF16", (width, h)), TensorSpec(f"{p}.attn.compressor.norm.weight", "BF16", (512,))]
    if ratio == 4:
        q = f"{p}.attn.indexer"
        s += _fp8(f"{q}.wq_b", 8192, 1024) + [TensorSpec(f"{q}.weights_proj.weight", "BF16", (64, h))]
        s += [TensorSpec(f"{q}.compressor.ape", "F32", (4, 256)), TensorSpec(f"{q}.compressor.wkv.weight", "BF16", (256, h)),
              TensorSpec(f"{q}.compressor.wgate.weight", "BF16", (256, h)), TensorSpec(f"{q}.compressor.norm.weight", "BF16", (128,))]
    return s


def v4_flash_specs() -> list[list[TensorSpec]]:
    """Every published tensor, grouped by shard: embeddings, a layer per shard, then head and norm, then MTP."""
    config = v4_flash_config()
    ratios = config["compress_ratios"]
    h = V4_HIDDEN
    top = [TensorSpec("embed.weight", "BF16", (V4_VOCAB, h)), TensorSpec("hc_head_fn", "F32", (4, 4 * h)),
           TensorSpec("hc_head_base", "F32", (4,)), TensorSpec("hc_head_scale", "F32", (1,))]
    layers = [_v4_layer(f"layers.{i}", i, ratios[i], i < config["num_hash_layers"]) for i in range(V4_LAYERS)]
    tail = [TensorSpec("norm.weight", "BF16", (h,)), TensorSpec("head.weight", "BF16", (V4_VOCAB, h))]
    mtp = _v4_layer("mtp.0", V4_LAYERS, 0, False) + [TensorSpec(f"mtp.0.{n}.weight", "BF16", (h,)) for n in ("enorm", "hnorm", "norm")]
    mtp += _fp8("mtp.0.e_proj", h, h) + _fp8("mtp.0.h_proj", h, h) + [TensorSpec(f"mtp.0.hc_head_{p}", "F32", s)
                                                                       for p, s in (("fn", (4, 4 * h)), ("base", (4,)), ("scale", (1,)))]
    shards = [top] + layers + [tail, mtp]
    assert len(shards) == V4_SHARDS
    return shards


# ---------------------------------------------------------------------------------------------
# Step-3.7-Flash
# ---------------------------------------------------------------------------------------------


def step3p7_flash_config() -> dict:
    """Step-3.7-Flash's config: the README's facts (45 layers, hidden 4096, vocab 128896, 288 experts of 1280,
    top-8, shared expert 1280, layers 0-2 dense, head-wise gate), mlx-vlm's defaults for the rest."""
    text = {"model_type": "step3p5", "hidden_size": 4096, "num_hidden_layers": 45, "vocab_size": 128896, "moe_num_experts": 288,
            "moe_intermediate_size": 1280, "moe_top_k": 8, "share_expert_dim": 1280, "moe_layers_enum": ",".join(map(str, range(3, 45))),
            "use_head_wise_attn_gate": True, "use_moe_router_bias": True, "num_attention_heads": 64, "num_attention_groups": 8,
            "head_dim": 128, "intermediate_size": 11264, "torch_dtype": "bfloat16", "num_nextn_predict_layers": 0}
    return {"architectures": ["Step3p7ForConditionalGeneration"], "model_type": "step3p7", "torch_dtype": "bfloat16",
            "text_config": text, "vision_config": {"model_type": "perception_encoder"}, "vocab_size": 128896,
            "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}}


def step3p7_flash_specs() -> list[list[TensorSpec]]:
    """The NVFP4 release's tensors: stacked experts U8 + F8_E4M3 scales + F32 [E] global and input scales, rest BF16."""
    sys.path.insert(0, str(ROOT / "fixtures"))
    import family_step  # noqa: E402
    from fixture_lib import vlm_model  # noqa: E402
    from mlx.utils import tree_flatten

    model = vlm_model(step3p7_flash_config())  # lazy: shapes only, nothing allocated
    views = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in tree_flatten(model.parameters())}
    specs: list[TensorSpec] = []
    for name, v in family_step.published(views).items():
        if ".moe." in name and name.endswith("_proj.weight"):
            base = name.removesuffix(".weight")
            e, out, inp = v.shape
            specs += [TensorSpec(name, "U8", (e, out, inp // 2)), TensorSpec(f"{base}.weight_scale", "F8_E4M3", (e, out, inp // 16)),
                      TensorSpec(f"{base}.weight_scale_2", "F32", (e,)), TensorSpec(f"{base}.input_scale", "F32", (e,))]
        else:
            specs.append(TensorSpec(name, "F32" if name.endswith("router_bias") else "BF16", tuple(v.shape)))
    return [specs[i : i + 400] for i in range(0, len(specs), 400)]


# ---------------------------------------------------------------------------------------------


def write_release(out: Path, config: dict, shards: list[list[TensorSpec]]) -> Path:
    """config.json, the index and one sparse header-only file per shard (HF naming)."""
    out.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, specs in zip(names, shards):
        write_header_only(out / fname, specs)
        weight_map.update({s.name: fname for s in specs})
    write_index(out, weight_map, sum(s.nbytes for specs in shards for s in specs))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
