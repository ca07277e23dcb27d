"""Synthetic checkpoints for `fmtconv bench`, in the published naming and dtypes, of a requested size.

DeepSeek-V4 style (`generate_checkpoint`): routed experts `layers.N.ffn.experts.E.w1|w2|w3.weight` as packed
FP4 (I8, two E2M1 per byte, low nibble first) with an F8_E8M0 `.scale` per 32 inputs; attention and shared
experts F8_E4M3 with 128x128 F8_E8M0 `.scale`; embed, head, norms, router, compressor and indexer weights
BF16; hyper-connections, sinks and router bias F32 (the conventions of fixtures/deepseek-v4-tiny).

DeepSeek-V3 style (`generate_v3_checkpoint`): every linear layer F8_E4M3 with an F32 `weight_scale_inv` per
128x128 block, embed/head/norms/router BF16, `e_score_correction_bias` F32, HF names
(`model.layers.N.mlp.experts.E.gate_proj.weight`, ...), the layout mlx_lm's deepseek_v3 `sanitize()` reads
itself, plus a word-level tokenizer so `mlx_lm.convert` runs on it.

Codes are random bytes from a pool, so generation runs at disk speed; each checkpoint is kept under
./bench-data/ with a completion stamp and reused for the same size and shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GENERATOR_VERSION = 1
V3_GENERATOR_VERSION = 1
DEFAULT_DIR = Path("bench-data")
_SRC_SHARD_BYTES = 2 * 10**9
_POOL_BYTES = 1 << 26  # random bytes reused at random offsets: generation is bound by the disk, not the RNG

Spec = tuple[str, str, tuple[int, ...], str]  # (published name, safetensors dtype, shape, kind)


def synthetic_config(size_bytes: int, *, hidden: int = 4096, moe_inter: int = 2048, experts: int = 64,
                     vocab: int = 32768, layers: int | None = None) -> dict[str, Any]:
    """DeepSeek-V4-Flash's config.json shape (model_type deepseek_v41, as fixtures/deepseek-v4-tiny), scaled
    to `size_bytes`: Flash's attention geometry at hidden 4096, fewer experts and layers, a smaller vocab."""
    heads = max(1, hidden // 64)
    config: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v41",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "expert_dtype": "fp4",
        "hc_eps": 1e-06,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "head_dim": 512,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "index_head_dim": 128,
        "index_n_heads": heads,
        "index_topk": 512,
        "max_position_embeddings": 65536,
        "moe_intermediate_size": moe_inter,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts_per_tok": 6,
        "num_hash_layers": 0,
        "num_key_value_heads": 1,
        "num_nextn_predict_layers": 0,
        "o_groups": 8,
        "o_lora_rank": hidden // 4,
        "q_lora_rank": hidden // 4,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "sliding_window": 128,
        "swiglu_limit": 10.0,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
        "compress_rope_theta": 160000,
    }
    if layers is None:
        _set_layers(config, 1)
        fixed = spec_bytes(source_specs(config, layers=False))
        per_layer = spec_bytes(source_specs(config)) - fixed
        layers = max(1, math.ceil((size_bytes - fixed) / per_layer))
    _set_layers(config, layers)
    return config


def _set_layers(config: dict[str, Any], n: int) -> None:
    # Layer 0 attends in its window only; then 4:1 (compressing, indexed) and 128:1 layers alternate.
    ratios = [0] + [4 if i % 2 else 128 for i in range(1, n)]
    config["num_hidden_layers"] = n
    config["compress_ratios"] = ratios
    config["kv_source_layer_ids"] = [i for i, r in enumerate(ratios) if r]
    config["index_source_layer_ids"] = [i for i, r in enumerate(ratios) if r == 4]


def spec_bytes(specs: list[Spec]) -> int:
    from fmtconv.formats.safetensors_io import TensorSpec

    return sum(TensorSpec(n, d, s).nbytes for n, d, s, _ in specs)


def source_specs(config: dict[str, Any], *, layers: bool = True) -> list[Spec]:
    """(published name, safetensors dtype, shape, kind) of every stored tensor, in the release's order.

    Shapes follow mlx_lm 0.32.2 deepseek_v41 (Attention, Compressor, Indexer, SharedMLP, Router,
    SwitchGLU, HyperConnection) mapped back to DeepSeek-V4's names (tests/test_scale_bench.py checks
    them against the mlx_lm model through fmtconv's DeepSeek-V4 layout).
    """
    h, inter, e = config["hidden_size"], config["moe_intermediate_size"], config["n_routed_experts"]
    heads, hd, ql = config["num_attention_heads"], config["head_dim"], config["q_lora_rank"]
    og, ol = config["o_groups"], config["o_lora_rank"]
    ih, ihd, hc = config["index_n_heads"], config["index_head_dim"], config["hc_mult"]
    mix = (2 + hc) * hc
    out: list[tuple[str, str, tuple[int, ...], str]] = []

    def fp8(name: str, shape: tuple[int, int]) -> None:
        out.append((f"{name}.weight", "F8_E4M3", shape, "fp8"))
        out.append((f"{name}.scale", "F8_E8M0", (-(-shape[0] // 128), -(-shape[1] // 128)), "fp8scale"))

    def fp4(name: str, shape: tuple[int, int]) -> None:
        out.append((f"{name}.weight", "I8", (shape[0], shape[1] // 2), "fp4"))
        out.append((f"{name}.scale", "F8_E8M0", (shape[0], shape[1] // 32), "fp4scale"))

    def bf16(name: str, shape: tuple[int, ...], kind: str = "bf16") -> None:
        out.append((name, "BF16", shape, kind))

    def f32(name: str, shape: tuple[int, ...]) -> None:
        out.append((name, "F32", shape, "f32"))

    bf16("embed.weight", (config["vocab_size"], h))
    n_layers = config["num_hidden_layers"] if layers else 0
    ratios = config.get("compress_ratios", [])
    for i in range(n_layers):
        p = f"layers.{i}"
        a = f"{p}.attn"
        f32(f"{a}.attn_sink", (heads,))
        if i in config.get("kv_source_layer_ids", []):
            bf16(f"{a}.compressor.norm.weight", (hd,), "norm")
            if ratios[i] > 1:
                bf16(f"{a}.compressor.wgate.weight", (hd, h))
            bf16(f"{a}.compressor.wkv.weight", (hd, h))
        if i in config.get("index_source_layer_ids", []):
            if i in config.get("kv_source_layer_ids", []):
                bf16(f"{a}.indexer.k_norm.weight", (ihd,), "norm")
            bf16(f"{a}.indexer.weights_proj.weight", (ih, h))
            if i in config.get("kv_source_layer_ids", []):
                bf16(f"{a}.indexer.wk.weight", (ihd, hd))
            fp8(f"{a}.indexer.wq_b", (ih * ihd, ql))
        bf16(f"{a}.kv_norm.weight", (hd,), "norm")
        bf16(f"{a}.q_norm.weight", (ql,), "norm")
        fp8(f"{a}.wkv", (hd, h))
        fp8(f"{a}.wo_a", (og * ol, heads * hd // og))
        fp8(f"{a}.wo_b", (h, og * ol))
        fp8(f"{a}.wq_a", (ql, h))
        fp8(f"{a}.wq_b", (heads * hd, ql))
        bf16(f"{p}.attn_norm.weight", (h,), "norm")
        for x in range(e):
            fp4(f"{p}.ffn.experts.{x}.w1", (inter, h))
            fp4(f"{p}.ffn.experts.{x}.w2", (h, inter))
            fp4(f"{p}.ffn.experts.{x}.w3", (inter, h))
        f32(f"{p}.ffn.gate.bias", (e,))
        bf16(f"{p}.ffn.gate.weight", (e, h))
        fp8(f"{p}.ffn.shared_experts.w1", (inter, h))
        fp8(f"{p}.ffn.shared_experts.w2", (h, inter))
        fp8(f"{p}.ffn.shared_experts.w3", (inter, h))
        bf16(f"{p}.ffn_norm.weight", (h,), "norm")
        for k in ("attn", "ffn"):
            f32(f"{p}.hc_{k}_base", (mix,))
            f32(f"{p}.hc_{k}_fn", (mix, hc * h))
            f32(f"{p}.hc_{k}_scale", (3,))
    bf16("head.weight", (config["vocab_size"], h))
    bf16("norm.weight", (h,), "norm")
    return out


class _Pool:
    """Random bytes served from a fixed pool at random offsets (fast; statistics do not matter here)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, _POOL_BYTES, dtype=np.uint8)

    def take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.uint8)
        done = 0
        while done < n:
            off = int(self.rng.integers(0, _POOL_BYTES))
            k = min(n - done, _POOL_BYTES - off)
            out[done : done + k] = self.pool[off : off + k]
            done += k
        return out


def _synth(pool: _Pool, dtype: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Stored bytes of one tensor: random codes in a realistic range, never NaN/inf."""
    n = int(np.prod(shape))
    if kind == "fp4":  # any pair of E2M1 codes
        return pool.take(n)
    if kind == "fp4scale":  # 2^-9 .. 2^-6: weights of magnitude <= 6 * 2^-6
        return 118 + (pool.take(n) & 3)
    if kind == "fp8":  # E4M3 with exponent field <= 7 (|v| < 2): bit 6 cleared, so never the NaN codes
        return pool.take(n) & 0xBF
    if kind == "fp8scale":  # 2^-10 .. 2^-7
        return 117 + (pool.take(n) & 3)
    if kind in ("bf16", "norm"):
        r = pool.take(2 * n).view(np.uint16)
        if kind == "norm":  # 1.0 .. 2.0
            return (np.uint16(0x3F80) | (r & np.uint16(0x7F))).view(np.uint8)
        exp = (np.uint16(119) + ((r >> np.uint16(7)) & np.uint16(3))) << np.uint16(7)  # 2^-8 .. 2^-5
        return ((r & np.uint16(0x807F)) | exp).view(np.uint8)
    if kind == "f32":
        return (pool.rng.standard_normal(n).astype(np.float32) * np.float32(0.02)).view(np.uint8)
    if kind == "fp8scale_f32":  # float32 in [2^-10, 2^-6), random significands (DeepSeek-V3's weight_scale_inv)
        r = pool.take(4 * n).view(np.uint32)
        exp = (np.uint32(117) + (r >> np.uint32(30))) << np.uint32(23)
        return (exp | (r & np.uint32(0x7FFFFF))).view(np.uint8)
    raise ValueError(kind)


def checkpoint_dir(root: Path, size_bytes: int) -> Path:
    return Path(root) / f"deepseek-v4-synthetic-{size_bytes}"


def generate_checkpoint(root: Path | None, size_bytes: int, *, quiet: bool = False, **shape: Any) -> Path:
    """The synthetic DeepSeek-V4 checkpoint for `size_bytes` under `root`; reused when a complete one is there."""
    root = Path(root) if root is not None else DEFAULT_DIR
    config = synthetic_config(size_bytes, **shape)
    stamp = {"generator": GENERATOR_VERSION, "size": size_bytes, "config": config}
    path = checkpoint_dir(root, size_bytes) if not shape else root / f"deepseek-v4-synthetic-{size_bytes}-{_digest(shape)}"

    def side_files(tmp: Path) -> None:
        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")

    return _write_checkpoint(path, source_specs(config), config, stamp, "DeepSeek-V4", quiet, side_files)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3 style (FP8 + float32 weight_scale_inv), for mlx_lm.convert
# ---------------------------------------------------------------------------------------------


def v3_config(size_bytes: int, *, hidden: int = 4096, moe_inter: int = 2048, experts: int = 64, vocab: int = 32768,
              q_lora: int = 1536, kv_lora: int = 512, layers: int | None = None) -> dict[str, Any]:
    """DeepSeek-V3's config.json (model_type deepseek_v3, as fixtures/deepseek-v3-fp8-tiny) at hidden 4096 with V3's
    attention geometry (q_lora 1536, kv_lora 512, heads of 128 + 64 rope), one dense layer, then MoE layers
    enough to reach `size_bytes`."""
    heads = max(1, hidden // 128)
    config: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "kv_lora_rank": kv_lora,
        "max_position_embeddings": 4096,
        "moe_intermediate_size": moe_inter,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts_per_tok": 8,
        "num_key_value_heads": heads,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": q_lora,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": vocab,
    }
    if layers is None:
        config["num_hidden_layers"] = 1
        fixed = spec_bytes(v3_specs(config))
        config["num_hidden_layers"] = 2
        per_layer = spec_bytes(v3_specs(config)) - fixed
        layers = 1 + max(1, math.ceil((size_bytes - fixed) / per_layer))
    config["num_hidden_layers"] = layers
    return config


def v3_specs(config: dict[str, Any]) -> list[Spec]:
    """(HF name, dtype, shape, kind) of every stored tensor of a DeepSeek-V3 FP8 release, in its order.

    Shapes follow mlx_lm 0.32.2 deepseek_v3 (tests/test_scale_bench.py checks them against the mlx_lm model)."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    nope, rope, vd = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    ql, kvl = config["q_lora_rank"], config["kv_lora_rank"]
    out: list[Spec] = []

    def fp8(name: str, shape: tuple[int, int]) -> None:
        out.append((f"{name}.weight", "F8_E4M3", shape, "fp8"))
        out.append((f"{name}.weight_scale_inv", "F32", (-(-shape[0] // 128), -(-shape[1] // 128)), "fp8scale_f32"))

    def mlp(prefix: str, inter: int) -> None:
        fp8(f"{prefix}.down_proj", (h, inter))
        fp8(f"{prefix}.gate_proj", (inter, h))
        fp8(f"{prefix}.up_proj", (inter, h))

    out.append(("model.embed_tokens.weight", "BF16", (config["vocab_size"], h), "bf16"))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.append((f"{p}.input_layernorm.weight", "BF16", (h,), "norm"))
        if i < config["first_k_dense_replace"]:
            mlp(f"{p}.mlp", config["intermediate_size"])
        else:
            for e in range(config["n_routed_experts"]):
                mlp(f"{p}.mlp.experts.{e}", config["moe_intermediate_size"])
            out.append((f"{p}.mlp.gate.e_score_correction_bias", "F32", (config["n_routed_experts"],), "f32"))
            out.append((f"{p}.mlp.gate.weight", "BF16", (config["n_routed_experts"], h), "bf16"))
            mlp(f"{p}.mlp.shared_experts", config["moe_intermediate_size"] * config["n_shared_experts"])
        out.append((f"{p}.post_attention_layernorm.weight", "BF16", (h,), "norm"))
        a = f"{p}.self_attn"
        fp8(f"{a}.kv_a_proj_with_mqa", (kvl + rope, h))
        out.append((f"{a}.kv_a_layernorm.weight", "BF16", (kvl,), "norm"))
        fp8(f"{a}.kv_b_proj", (heads * (nope + vd), kvl))
        fp8(f"{a}.o_proj", (h, heads * vd))
        fp8(f"{a}.q_a_proj", (ql, h))
        out.append((f"{a}.q_a_layernorm.weight", "BF16", (ql,), "norm"))
        fp8(f"{a}.q_b_proj", (heads * (nope + rope), ql))
    out.append(("model.norm.weight", "BF16", (h,), "norm"))
    out.append(("lm_head.weight", "BF16", (config["vocab_size"], h), "bf16"))
    return out


def v3_checkpoint_dir(root: Path, size_bytes: int) -> Path:
    return Path(root) / f"deepseek-v3-synthetic-{size_bytes}"


def generate_v3_checkpoint(root: Path | None, size_bytes: int, *, quiet: bool = False, **shape: Any) -> Path:
    """The synthetic DeepSeek-V3 FP8 checkpoint for `size_bytes` under `root` (with a tokenizer); reused when there."""
    root = Path(root) if root is not None else DEFAULT_DIR
    config = v3_config(size_bytes, **shape)
    stamp = {"generator": V3_GENERATOR_VERSION, "size": size_bytes, "config": config}
    path = v3_checkpoint_dir(root, size_bytes) if not shape else root / f"deepseek-v3-synthetic-{size_bytes}-{_digest(shape)}"
    return _write_checkpoint(path, v3_specs(config), config, stamp, "DeepSeek-V3 FP8", quiet,
                             lambda tmp: write_tokenizer(tmp, config["vocab_size"]))


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer with vocab_size ids (<unk>, <s>, </s>, w3, ...): what mlx_lm.convert loads and saves.
    Needs the `tokenizers` package (a dependency of mlx_lm); without it no tokenizer is written."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        return
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write_checkpoint(path: Path, specs: list[Spec], config: dict[str, Any], stamp: dict[str, Any], label: str, quiet: bool,
                      side_files: Callable[[Path], None]) -> Path:
    """Write specs' tensors (random codes) in 2 GB shards, index, config and side files into `path`, atomically;
    a complete checkpoint with the same stamp is reused."""
    from fmtconv.convert.pipeline import check_disk_space
    from fmtconv.formats.safetensors_io import SafetensorsWriter, TensorSpec, shard_names, write_index

    marker = path / "bench-complete.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == stamp:
                return path
        except (OSError, json.JSONDecodeError):
            pass
    total = spec_bytes(specs)
    if not quiet:
        print(f"generating a {total / 1e9:.2f} GB synthetic {label} checkpoint in {path} ...", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(path.parent, total)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[list[Spec]] = [[]]
    acc = 0
    for s in specs:
        nb = TensorSpec(s[0], s[1], s[2]).nbytes
        if shards[-1] and acc + nb > _SRC_SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append(s)
        acc += nb
    pool = _Pool()
    weight_map = {}
    for fname, shard in zip(shard_names(len(shards)), shards):
        w = SafetensorsWriter(tmp / fname, [TensorSpec(n, d, sh) for n, d, sh, _ in shard], {"format": "pt"})
        for n, d, sh, kind in shard:
            w.write(_synth(pool, d, sh, kind))
            weight_map[n] = fname
        w.close()
    write_index(tmp, weight_map, total)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    side_files(tmp)
    (tmp / "bench-complete.json").write_text(json.dumps(stamp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]
