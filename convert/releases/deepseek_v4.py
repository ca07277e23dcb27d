"""DeepSeek-V4 as published (DeepSeek-V4-Flash: 46 shards, names without a `model.` prefix).

Source: ../shared/releases/README.md (the V4-Flash index and config.json), DeepSeek-V4
inference/model.py and convert.py.  Per layer `layers.N.`: `attn.{wq_a,wq_b,wkv,wo_a,wo_b}`
(FP8; `wo_a` flattened to 2-D [o_groups * o_lora_rank, in]), `attn.{q_norm,kv_norm}`,
`attn.attn_sink`, ratio-4 and ratio-128 layers' `attn.compressor.{ape,wkv,wgate,norm}` and ratio-4
layers' `attn.indexer.{wq_b,weights_proj,compressor.*}`; `ffn.gate.weight`, `ffn.gate.bias` (scored
layers) or `ffn.gate.tid2eid` I64 (hash layers); routed experts one tensor each,
`ffn.experts.E.{w1,w2,w3}` (MXFP4); `ffn.shared_experts.{w1,w2,w3}`; `attn_norm`, `ffn_norm`;
hyper-connections `hc_{attn,ffn}_{fn,base,scale}`.  Top level: `embed`, `head`, `norm`,
`hc_head_{fn,base,scale}`; `mtp.K.*` is the multi-token-prediction layer, which runtimes drop.

The MTP layer (V4-Flash: one, `mtp.0.`; release index, and mlx-vlm 0.7.10 `DeepseekV4MTPDraftModel.sanitize`):
a layer's own names under `mtp.K.` (`attn.*` with a 2-D `wo_a`, `ffn.*` with FP4 routed experts one tensor each,
`ffn.gate.{weight,bias}` and no `tid2eid`, `attn_norm`, `ffn_norm`, `hc_{attn,ffn}_*`; no compressor or indexer,
its `compress_ratios` entry being 0), plus `e_proj` and `h_proj` (FP8 with E8M0 scales, [hidden, hidden] each; no
fused `eh_proj`), `enorm`, `hnorm`, `norm` and `hc_head_{fn,base,scale}`.  No embedding or head of its own: the
drafter uses the main model's.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fmtconv.formats.base import SourceGroup

EXPERT_KEY = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight")
_LAYER = re.compile(r"layers\.(\d+)\.")
# w1 = gate, w2 = down, w3 = up (inference/model.py Expert: w2(act(w1(x)) * w3(x))).
EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
MTP_PREFIX = "mtp."
HC_PARAMS = ("fn", "base", "scale")
# `mtp.K.rest`: the MTP layer K and the name within it.
MTP_KEY = re.compile(r"mtp\.(\d+)\.(.+)")
# Routed experts of the MTP layer (the name within it), one tensor each as in the main layers.
MTP_EXPERT_KEY = re.compile(r"ffn\.experts\.(\d+)\.(w[123])\.weight")
# What only an MTP layer has; named in the error when a source has none.
MTP_OWN = ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight")


def is_mtp(name: str) -> bool:
    return name.startswith(MTP_PREFIX)


def mtp_part(name: str) -> tuple[int, str] | None:
    """`mtp.K.rest` -> (K, rest); None for the main model's names."""
    m = MTP_KEY.fullmatch(name)
    return (int(m[1]), m[2]) if m else None


def split_groups(groups: list[SourceGroup], n_layers: int) -> tuple[list[SourceGroup], dict[tuple[str, str], dict[int, SourceGroup]], list[str]]:
    """The release's weights in three: the ones stored whole; the routed experts, by (`layers.N.ffn`, w1/w2/w3) and
    expert index; the names runtimes drop (the MTP layer, layers beyond num_hidden_layers)."""
    whole: list[SourceGroup] = []
    experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
    dropped: list[str] = []
    for g in groups:
        layer = _LAYER.match(g.name)
        if is_mtp(g.name) or (layer and int(layer[1]) >= n_layers):
            dropped.append(g.name)
        elif m := EXPERT_KEY.fullmatch(g.name):
            experts.setdefault((f"layers.{m[1]}.ffn", m[3]), {})[int(m[2])] = g
        else:
            whole.append(g)
    return whole, experts, dropped


def without_fp4_experts(config: dict[str, Any]) -> dict[str, Any]:
    """The release's config once its experts are no longer FP4: `expert_dtype` ("fp4") removed, model_type kept."""
    out = dict(config)
    out.pop("expert_dtype", None)
    return out


def split_o_groups(values: np.ndarray, groups: int) -> np.ndarray:
    """wo_a as stored, [groups * rank, in] -> [groups, rank, in] (a reshape: rows keep their bytes)."""
    return values.reshape(groups, -1, values.shape[-1])
