"""`fmtconv bench`: fmtconv's conversion vs the usual pipeline vs a plain copy, on a synthetic DeepSeek-V4 checkpoint.

The checkpoint (default >= 4 GB, kept under ./bench-data/ and reused for the same size) has
DeepSeek-V4's published naming and dtypes: routed experts `layers.N.ffn.experts.E.w1|w2|w3.weight`
as packed FP4 (I8, two E2M1 per byte, low nibble first) with an F8_E8M0 `.scale` per 32 inputs;
attention and shared experts F8_E4M3 with 128x128 F8_E8M0 `.scale`; embed, head, norms, router,
compressor and indexer weights BF16; hyper-connections, sinks and router bias F32 (the same
conventions as fixtures/deepseek-v4-tiny). Codes are random bytes, so generation runs at disk speed.

Three phases run one after another, each in a child process so its peak RSS (the child's VmHWM,
ru_maxrss from wait4 where /proc is missing) is its own:
  fmtconv  fmtconv.convert.convert(recipe q4q8): MXFP4 experts -> 4-bit affine, FP8 -> 8-bit.
  usual    what people do: per output tensor, dequantize to bfloat16 (NumPy for FP4, mx.from_fp8
           for FP8), stack experts, mx.quantize, mx.save_safetensors in 5 GB shards, one process.
  copy     read every source byte and write as many bytes as fmtconv writes, fsync.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

GENERATOR_VERSION = 1
DEFAULT_DIR = Path("bench-data")
PHASES = ("fmtconv", "usual", "copy")
PHASES_ALL = ("fmtconv", "mse", "usual", "copy")  # mse: the fmtconv phase with the error-minimising encoder
_SRC_SHARD_BYTES = 2 * 10**9
_POOL_BYTES = 1 << 26  # random bytes reused at random offsets: generation is bound by the disk, not the RNG
_COPY_CHUNK = 1 << 24


# ---------------------------------------------------------------------------------------------
# The synthetic checkpoint
# ---------------------------------------------------------------------------------------------


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
        fixed = _bytes(source_specs(config, layers=False))
        per_layer = _bytes(source_specs(config)) - fixed
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


def _bytes(specs: list[tuple[str, str, tuple[int, ...], str]]) -> int:
    from fmtconv.formats.safetensors_io import TensorSpec

    return sum(TensorSpec(n, d, s).nbytes for n, d, s, _ in specs)


def source_specs(config: dict[str, Any], *, layers: bool = True) -> list[tuple[str, str, tuple[int, ...], str]]:
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
    raise ValueError(kind)


def checkpoint_dir(root: Path, size_bytes: int) -> Path:
    return Path(root) / f"deepseek-v4-synthetic-{size_bytes}"


def generate_checkpoint(root: Path | None, size_bytes: int, *, quiet: bool = False, **shape: Any) -> Path:
    """The synthetic checkpoint for `size_bytes` under `root`; reused when a complete one is there."""
    from fmtconv.formats.safetensors_io import SafetensorsWriter, TensorSpec, shard_names, write_index

    root = Path(root) if root is not None else DEFAULT_DIR
    config = synthetic_config(size_bytes, **shape)
    specs = source_specs(config)
    stamp = {"generator": GENERATOR_VERSION, "size": size_bytes, "config": config}
    path = checkpoint_dir(root, size_bytes) if not shape else root / f"deepseek-v4-synthetic-{size_bytes}-{_digest(shape)}"
    marker = path / "bench-complete.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == stamp:
                return path
        except (OSError, json.JSONDecodeError):
            pass
    total = _bytes(specs)
    if not quiet:
        print(f"generating a {total / 1e9:.2f} GB synthetic DeepSeek-V4 checkpoint in {path} ...", file=sys.stderr)
    from fmtconv.convert.pipeline import check_disk_space

    root.mkdir(parents=True, exist_ok=True)
    check_disk_space(root, total)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[list[tuple[str, str, tuple[int, ...], str]]] = [[]]
    acc = 0
    for s in specs:
        nb = TensorSpec(s[0], s[1], s[2]).nbytes
        if shards[-1] and acc + nb > _SRC_SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append(s)
        acc += nb
    names = shard_names(len(shards))
    pool = _Pool()
    weight_map = {}
    for fname, shard in zip(names, shards):
        w = SafetensorsWriter(tmp / fname, [TensorSpec(n, d, sh) for n, d, sh, _ in shard], {"format": "pt"})
        for n, d, sh, kind in shard:
            w.write(_synth(pool, d, sh, kind))
            weight_map[n] = fname
        w.close()
    write_index(tmp, weight_map, total)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
    (tmp / "bench-complete.json").write_text(json.dumps(stamp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# The three phases (each runs in a child process)
# ---------------------------------------------------------------------------------------------


def phase_fmtconv(src: Path, out: Path, *, recipe: str, kernel_backend: str, workers: int | None,
                  encoder: str = "minmax") -> dict[str, Any]:
    from fmtconv.convert.api import convert

    t0 = time.perf_counter()
    s = convert(src, out, recipe=recipe, kernel_backend=kernel_backend, workers=workers, quiet=True, overwrite=True,
                encoder=encoder)
    return {"wall_s": time.perf_counter() - t0, "bytes_out": s["bytes_out"]}


def phase_usual(src: Path, out: Path, *, recipe: str, max_shard_bytes: int = 5 << 30) -> dict[str, Any]:
    """Per output tensor: dequantize to bfloat16, stack experts, mx.quantize, save in shards (one process).

    The tensors and their targets come from fmtconv's plan (so both do the same work); the
    arithmetic is NumPy's FP4 table lookup, MLX's from_fp8, and MLX's quantize on its CPU backend.
    """
    import mlx.core as mx

    from fmtconv.convert.api import plan as make_plan
    from fmtconv.convert.plan import CAST, PASSTHROUGH, REQUANT
    from fmtconv.formats.safetensors_io import Checkpoint, shard_names
    from fmtconv.kernels_ref import E2M1_VALUES

    t0 = time.perf_counter()
    p = make_plan(src, recipe)
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, Any] = {}
    size = 0
    files: list[Path] = []
    weight_map: dict[str, Path] = {}
    bytes_out = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            f = out / f"shard-{len(files):05d}.safetensors"
            mx.save_safetensors(str(f), shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(shard, f))
            files.append(f)
            shard, size = {}, 0

    def decode(ck: Checkpoint, g) -> mx.array:
        w = ck.raw(g.parts.get("weight", g.name))
        if g.codec == "mxfp4":
            packed = w.reshape(g.rows, -1)
            vals = np.empty((g.rows, packed.shape[1] * 2), dtype=np.float32)
            vals[:, 0::2] = E2M1_VALUES[packed & 0x0F]
            vals[:, 1::2] = E2M1_VALUES[packed >> 4]
            s = np.ldexp(np.float32(1), ck.raw(g.parts["scale"]).reshape(g.rows, -1).astype(np.int32) - 127)
            vals = (vals.reshape(g.rows, -1, 32) * s[..., None]).reshape(g.shape)
            return mx.array(vals).astype(mx.bfloat16)
        if g.codec == "fp8_block":
            bm, bn = g.params.get("block", (128, 128))
            x = mx.from_fp8(mx.array(w.reshape(g.shape)), dtype=mx.bfloat16)
            s = mx.power(2.0, mx.array(ck.raw(g.parts["scale"]).astype(np.float32) - 127)).reshape(-(-g.shape[0] // bm), -1)
            s = mx.repeat(mx.repeat(s, bm, axis=0), bn, axis=1)[: g.shape[0], : g.shape[1]]
            return (x * s).astype(mx.bfloat16)
        return mx.array(np.asarray(ck.array(g.name)))

    with Checkpoint(src) as ck:
        for pt in p.tensors:
            t = pt.target
            parts = [decode(ck, g) for g in t.sources]
            w = parts[0] if len(parts) == 1 else mx.stack(parts)
            if t.transform is not None:
                w = mx.array(np.asarray(t.transform(np.array(w.astype(mx.float32))))).astype(w.dtype)
            if t.rows is not None:
                w = w[..., slice(*t.rows), :]
            if pt.route == REQUANT:
                wq, sc, bi = mx.quantize(w.astype(mx.bfloat16), group_size=pt.group_size, bits=pt.bits)
                new = {f"{t.module}.weight": wq, f"{t.module}.scales": sc, f"{t.module}.biases": bi}
            elif pt.route in (PASSTHROUGH, CAST):
                new = {t.name: w.astype(getattr(mx, pt.dtype))}
            else:
                raise RuntimeError(f"usual pipeline: route {pt.route} not handled")
            mx.eval(new)
            nb = sum(v.nbytes for v in new.values())
            if size + nb > max_shard_bytes:
                flush()
            shard.update(new)
            size += nb
            bytes_out += nb
            for g in t.sources:
                for name in g.parts.values():
                    ck.release(name)
            del parts, w
        flush()
    for f in files:
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    names = shard_names(len(files))
    for i, f in enumerate(files):
        os.replace(f, out / names[i])
    return {"wall_s": time.perf_counter() - t0, "bytes_out": bytes_out}


def phase_copy(src: Path, out: Path, *, bytes_out: int) -> dict[str, Any]:
    """Read every source weight byte, write `bytes_out` bytes (the source's, repeated as needed), fsync."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    buf = bytearray(_COPY_CHUNK)
    view = memoryview(buf)
    left = bytes_out
    with open(out / "copy.bin", "wb") as dst:
        for f in sorted(Path(src).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    k = min(n, left)
                    if k:
                        dst.write(view[:k])
                        left -= k
        while left > 0:
            k = min(left, len(buf))
            dst.write(view[:k])
            left -= k
        dst.flush()
        os.fsync(dst.fileno())
    return {"wall_s": time.perf_counter() - t0, "bytes_out": bytes_out}


# ---------------------------------------------------------------------------------------------
# Running phases in children and reporting
# ---------------------------------------------------------------------------------------------


def run_phase_in_child(phase: str, kwargs: dict[str, Any], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its result plus `peak_rss_bytes` (ru_maxrss of that child only)."""
    with tempfile.TemporaryDirectory(prefix="fmtconv-bench-") as d:
        result_path = Path(d) / "result.json"
        cmd = [sys.executable, "-m", "fmtconv.convert.bench", "--phase", phase, "--phase-args", json.dumps(kwargs),
               "--result", str(result_path)]
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"bench phase {phase!r} failed with exit code {proc.returncode}")
        result = json.loads(result_path.read_text())
    # ru_maxrss of a child starts at the RSS its parent had when it forked (Linux carries the pre-exec
    # high-water mark over exec), so the child's own VmHWM is the figure; ru_maxrss is the fallback.
    result["peak_rss_bytes"] = result.get("vm_hwm_bytes") or usage.ru_maxrss * 1024
    return result


def peak_rss_self() -> int | None:
    """This process's peak resident set size since exec (VmHWM in /proc/self/status), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _run_phase(phase: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    fn = {"fmtconv": phase_fmtconv, "mse": phase_fmtconv, "usual": phase_usual, "copy": phase_copy}[phase]
    kw = dict(kwargs)
    src, out = Path(kw.pop("src")), Path(kw.pop("out"))
    return fn(src, out, **kw)


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two bundles hold the same tensor names with the same bytes."""
    from fmtconv.formats.safetensors_io import Checkpoint

    with Checkpoint(a) as x, Checkpoint(b) as y:
        if set(x.tensors) != set(y.tensors):
            return False
        for name in x.tensors:
            if x.info(name).dtype != y.info(name).dtype or not np.array_equal(x.raw(name), y.raw(name)):
                return False
            x.release(name)
            y.release(name)
    return True


def run_bench(out_dir: Path | None, size_bytes: int, json_out: bool, keep: bool, *, recipe: str = "q4q8",
              kernel_backend: str = "cpu", workers: int | None = None, phases: tuple[str, ...] = PHASES,
              shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate (or reuse) the checkpoint, run the phases, print the table (or JSON), return the results.

    kernel_backend "cpu" by default: the usual pipeline's mx.quantize runs MLX's CPU backend here,
    so the two bundles must then be byte-identical (checked and reported).
    """
    from fmtconv.convert.api import plan as make_plan

    root = Path(out_dir) if out_dir is not None else DEFAULT_DIR
    src = generate_checkpoint(root, size_bytes, quiet=json_out, **(shape or {}))
    p = make_plan(src, recipe, kernel_backend=kernel_backend)
    params, bytes_in, bytes_out = p.total_params, p.source_bytes, p.total_bytes
    runs = root / "runs"
    results: dict[str, Any] = {}
    for phase in phases:
        out = runs / phase
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # an interrupted run would resume
        if phase in ("fmtconv", "mse"):
            kw = {"recipe": recipe, "kernel_backend": kernel_backend, "workers": workers,
                  "encoder": "mse" if phase == "mse" else "minmax"}
        elif phase == "usual":
            kw = {"recipe": recipe}
        else:
            kw = {"bytes_out": bytes_out}
        if not json_out:
            print(f"running {phase} ...", file=sys.stderr)
        r = run_phase_in_child(phase, {"src": str(src), "out": str(out), **kw})
        wall = r["wall_s"]
        results[phase] = {
            "wall_s": round(wall, 3),
            "params_per_s": round(params / wall, 1),
            "mb_per_s": round((bytes_in + r["bytes_out"]) / 1e6 / wall, 1),
            "mb_per_s_in": round(bytes_in / 1e6 / wall, 1),
            "bytes_out": r["bytes_out"],
            "peak_rss_mb": round(r["peak_rss_bytes"] / 1e6, 1),
        }
    identical = None
    if {"fmtconv", "usual"} <= set(phases) and kernel_backend == "cpu":
        identical = same_tensors(runs / "fmtconv", runs / "usual")
    if not keep:
        shutil.rmtree(runs, ignore_errors=True)
    report: dict[str, Any] = {
        "checkpoint": str(src),
        "source_bytes": bytes_in,
        "output_bytes": bytes_out,
        "params": params,
        "recipe": recipe,
        "kernel_backend": kernel_backend,
        "cpus": os.cpu_count(),
        "phases": results,
        "fmtconv_bytes_equal_usual": identical,
    }
    if "fmtconv" in results:
        f = results["fmtconv"]["wall_s"]
        if "usual" in results:
            report["ratio_fmtconv_over_usual"] = round(results["usual"]["wall_s"] / f, 3)
        if "copy" in results:
            report["ratio_fmtconv_over_copy"] = round(results["copy"]["wall_s"] / f, 3)
        if "mse" in results:
            report["ratio_mse_over_minmax"] = round(results["mse"]["wall_s"] / f, 3)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"checkpoint  {report['checkpoint']}")
    print(f"            {report['source_bytes'] / 1e9:.2f} GB in, {report['output_bytes'] / 1e9:.2f} GB out, "
          f"{report['params'] / 1e9:.2f} G params, recipe {report['recipe']}, backend {report['kernel_backend']}, "
          f"{report['cpus']} CPUs")
    print(f"{'phase':10s} {'wall s':>9s} {'Mparams/s':>11s} {'MB/s (in+out)':>14s} {'peak RSS MB':>12s}")
    for name, r in report["phases"].items():
        print(f"{name:10s} {r['wall_s']:9.2f} {r['params_per_s'] / 1e6:11.1f} {r['mb_per_s']:14.1f} {r['peak_rss_mb']:12.1f}")
    if "ratio_fmtconv_over_usual" in report:
        print(f"fmtconv / usual  {report['ratio_fmtconv_over_usual']:.2f}x  (target >= 3)")
    if "ratio_fmtconv_over_copy" in report:
        print(f"fmtconv / copy   {report['ratio_fmtconv_over_copy']:.2f}x  (target >= 0.5)")
    if "ratio_mse_over_minmax" in report:
        print(f"mse / minmax     {report['ratio_mse_over_minmax']:.2f}x wall  (target <= 3)")
    if report.get("fmtconv_bytes_equal_usual") is not None:
        print(f"fmtconv bytes == usual pipeline bytes: {report['fmtconv_bytes_equal_usual']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fmtconv.convert.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=4e9, help="synthetic checkpoint size in bytes (default 4e9)")
    ap.add_argument("--dir", help="where the synthetic checkpoint lives (default ./bench-data)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "metal", "cuda"])
    ap.add_argument("--workers", type=int)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--phase-args", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:
        result = _run_phase(a.phase, json.loads(a.phase_args))
        result["vm_hwm_bytes"] = peak_rss_self()
        Path(a.result).write_text(json.dumps(result))
        return 0
    run_bench(Path(a.dir) if a.dir else None, int(a.size), a.json, a.keep, kernel_backend=a.backend, workers=a.workers,
              phases=tuple(x for x in a.phases.split(",") if x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
