"""StepFun's Step-3.5-Flash and Step-3.7-Flash as published.

Source: ../shared/releases/README.md.  Text weights use StepFun's own names: routed experts stacked
`moe.{gate,up,down}_proj.weight` [E, out, in] (BF16 and NVFP4 releases) or one tensor per expert
`moe.experts.E.*` (LLM Compressor releases), router `moe.gate`, `moe.router_bias`, shared expert
`share_expert.*`, zero-centred norms (the runtime weight is stored + 1), MTP weights under `.mtp` or
in layers beyond num_hidden_layers.  Step-3.7-Flash (vision-language) nests the text model under
`model.language_model.`, the Perception-Encoder vision tower under `model.vision_model.` (open_clip
names: `transformer.resblocks.N.`, `attn.in_proj_weight`/`_bias`, PyTorch [out, in, kh, kw]
convolutions), the projector under `model.vit_large_projector.`, and keeps `lm_head.` at the top.
"""

from __future__ import annotations

TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.vision_model."
PROJECTOR_PREFIX = "model.vit_large_projector."
HEAD_PREFIX = "lm_head."
# Vision-tower convolutions and the input channels of each (PyTorch layout [out, in, kh, kw] as released).
VISION_CONVS = ("conv1.weight", "vit_downsampler1.weight", "vit_downsampler2.weight")


def is_mtp(name: str, layer: int | None, n_layers: int) -> bool:
    return ".mtp" in name or (layer is not None and layer >= n_layers)
