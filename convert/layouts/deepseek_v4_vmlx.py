"""DeepSeek-V4 for vMLX: the release's own names, which jang's deepseek_v4 model (the one vMLX runs) sanitizes itself.

Mirrors jang 2.5.50 `jang_tools/dsv4/mlx_model.py` (`Model.sanitize`, the modules of `DeepseekV4Model`), the model
class vMLX 1.6.81 loads through mlx-lm 0.31.x's `load_model`.  That sanitize is not idempotent (a key not under
`layers.N.` gets `model.` prepended), so the bundle keeps DeepSeek's names: `embed.*`, `head.*`, `norm.weight`,
`hc_head_*`, and under `layers.N.`: `attn.*` (compressor and indexer included; `wo_a` 2-D, as published and as its
Linear holds it), `attn_norm`, `ffn_norm`, `hc_{attn,ffn}_*`, `ffn.gate.{weight,bias,tid2eid}` (the hash table as
int32, the dtype its Gate declares), `ffn.shared_experts.w{1,2,3}`; the routed experts are stored stacked as
`ffn.switch_mlp.{gate,down,up}_proj`, which sanitize passes through like any `ffn.X` (-> `mlp.X`).  MTP layers and
layers beyond num_hidden_layers are dropped.  Recipes match, and `quantization` keys name, the runtime's module
paths (`model.layers.N.self_attn.wq_a`, `model.layers.N.mlp.switch_mlp.gate_proj`, `model.embed`, `lm_head`), every
quantized module explicitly; the bundle has no jang_config.json, so vMLX takes its plain mlx-lm route.
"""

from __future__ import annotations

import re
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor, stacked_experts
from fmtconv.convert.releases.deepseek_v4 import EXPERT_PROJ, split_groups, without_fp4_experts
from fmtconv.formats.base import SourceGroup

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_SHARED = re.compile(r"shared_experts\.(w[123])\.(weight|scales|biases)")
# Model.sanitize's renames inside a layer: (stored prefix, runtime prefix), first match wins.
_LAYER_RENAMES = (
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("attn.", "self_attn."),
    ("ffn.", "mlp."),
)
# Modules of jang's model with `to_quantized` (nn.Linear, SwitchLinear, nn.Embedding), by leaf of the runtime path.
# Not: the router `mlp.gate` (Gate, a plain Module), norms, hyper-connections, `ape`, sinks.
_QUANTIZABLE_LEAVES = frozenset({"wq_a", "wq_b", "wkv", "wo_a", "wo_b", "wgate", "weights_proj", "gate_proj", "up_proj", "down_proj"})
_QUANTIZABLE_TOP = frozenset({"model.embed", "lm_head"})


def jang_name(name: str) -> str:
    """A stored name -> the parameter path jang's Model.sanitize gives it."""
    if name.startswith("head."):
        return f"lm_head.{name[len('head.'):]}"
    m = _LAYER.fullmatch(name)
    if m is None:
        return f"model.{name}"
    rest = m[2]
    shared = _SHARED.fullmatch(rest.removeprefix("ffn."))
    if rest.startswith("ffn.") and shared:
        rest = f"mlp.shared_experts.{EXPERT_PROJ[shared[1]]}.{shared[2]}"
    else:
        rest = next((new + rest[len(old):] for old, new in _LAYER_RENAMES if rest.startswith(old)), rest)
    return f"model.layers.{m[1]}.{rest}"


def is_quantizable(runtime_name: str) -> bool:
    if not runtime_name.endswith(".weight"):
        return False
    module = runtime_name[: -len(".weight")]
    return module in _QUANTIZABLE_TOP or module.rsplit(".", 1)[-1] in _QUANTIZABLE_LEAVES


class DeepseekV4VmlxLayout(ModelLayout):
    """DeepSeek-V4-Flash as published, for vMLX (jang's deepseek_v4 model); chosen with `--runtime vmlx`."""

    family = "deepseek_v4"
    model_types = ("deepseek_v4",)
    runtime = "vmlx"
    # mlx-lm 0.31.x's load_model casts nothing, so the bundle's dtypes are the ones the model runs with; as jang's
    # own converter (convert_dsv4_jang.py read_passthrough), the release's float32 control tensors stay float32:
    # hyper-connections, attention sinks, router score biases and the compressors' positional biases.
    uncast = ("hc_attn_", "hc_ffn_", "hc_head_", "attn_sink", ".gate.bias", ".ape")
    integer_dtypes = {"tid2eid": "I32"}
    mlx_vlm_wraps = False
    explicit_quantization = True

    def runtime_name(self, name: str) -> str:
        return jang_name(name)

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        whole, experts, dropped = split_groups(groups, int(config["num_hidden_layers"]))
        out = [TargetTensor(g.name, (g,), quantizable=is_quantizable(jang_name(g.name))) for g in whole]
        out += stacked_experts(experts, config.get("n_routed_experts"),
                               lambda prefix, proj: f"{prefix}.switch_mlp.{EXPERT_PROJ[proj]}.weight")
        return out, dropped

    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        out = without_fp4_experts(config)
        out.pop("jang", None)  # vMLX would write it out as jang_config.json and take jang's own loader
        return out
