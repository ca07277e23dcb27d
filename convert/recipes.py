"""Recipes: ordered rules, first match wins, that give each output tensor its target.

A rule matches the module path mlx_lm uses after sanitize() (a regex searched in it), and
optionally the layer index (`layers`, an expression in `i` = layer index and `n` = number of
layers) and the source codec (`source`). Quantizing targets (affine, mxfp4, mxfp8, nvfp4)
apply only to modules the runtime can quantize; every other tensor takes the first rule
whose target is `keep`, `dense` or `drop`, and is kept in the compute dtype otherwise.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fmtconv.errors import FmtconvError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
# Affine encoders: MLX's own min/max rule (bit-exact with mx.quantize) or the error-minimising one (kernels_ref.affine_mse).
ENCODERS = ("minmax", "mse")
# Fixed (bits, group_size) of MLX's floating-point modes (mlx/ops.cpp, quantize: mode checks).
FP_MODE_PARAMS = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(".*", description="regex searched in the module path, e.g. 'switch_mlp'")
    layers: str | None = Field(None, description="expression in i (layer index) and n (layer count)")
    source: list[str] | None = Field(None, description="source codec names this rule applies to")
    note: str | None = None

    @field_validator("match")
    @classmethod
    def _regex_compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"match {v!r} is not a valid regular expression: {e}") from None
        return v

    @field_validator("layers")
    @classmethod
    def _layers_parse(cls, v: str | None) -> str | None:
        if v is not None:
            _compile_layer_expr(v)
        return v

    def matches(self, module: str, codec: str, num_layers: int) -> bool:
        if not re.search(self.match, module):
            return False
        if self.source is not None and codec not in self.source:
            return False
        if self.layers is not None:
            m = _LAYER.search(module)
            if m is None or not _eval_layer_expr(self.layers, int(m.group(1)), num_layers):
                return False
        return True


class AffineRule(_Rule):
    mode: Literal["affine"]
    bits: Literal[2, 3, 4, 5, 6, 8]
    group_size: Literal[32, 64, 128] = 64
    exact: bool = Field(False, description="only the lossless MXFP4 -> affine route; fail otherwise")
    on_indivisible: Literal["error", "keep"] = "error"
    encoder: Literal["minmax", "mse"] | None = Field(None, description="scales/biases: MLX's min/max or error-minimising; "
                                                     "default: the run's --encoder")


class FpRule(_Rule):
    mode: Literal["mxfp4", "mxfp8", "nvfp4"]
    on_indivisible: Literal["error", "keep"] = "error"

    @property
    def bits(self) -> int:
        return FP_MODE_PARAMS[self.mode][0]

    @property
    def group_size(self) -> int:
        return FP_MODE_PARAMS[self.mode][1]


class KeepRule(_Rule):
    mode: Literal["keep"]


class DenseRule(_Rule):
    mode: Literal["dense"]
    dtype: Literal["bfloat16", "float16", "float32"]


class DropRule(_Rule):
    mode: Literal["drop"]


Rule = Annotated[Union[AffineRule, FpRule, KeepRule, DenseRule, DropRule], Field(discriminator="mode")]
QuantRule = Union[AffineRule, FpRule]


class Recipe(BaseModel):
    """An ordered rule list; the last rule should match everything (the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    description: str = ""
    rules: list[Rule]

    def target_for(self, module: str, codec: str, *, quantizable: bool, num_layers: int, multimodal: bool = False) -> Rule | None:
        """The first rule that applies to this tensor; None means keep it in the compute dtype.

        A vision tower or projector (`multimodal`) is quantized only by a rule whose `match` is explicit,
        not by the catch-all default: runtimes' own converters keep them dense (mlx_vlm convert.py
        skip_multimodal_module), and so does every preset.
        """
        for rule in self.rules:
            is_quant = rule.mode in QUANT_MODES
            if is_quant and (not quantizable or (multimodal and rule.match == ".*")):
                continue
            if rule.matches(module, codec, num_layers):
                return rule
        return None

    def unused_rules(self, modules: Iterable[str]) -> list[str]:
        """Match patterns that select no module at all (a likely typo; the plan warns)."""
        mods = list(modules)
        return [r.match for r in self.rules if r.match != ".*" and not any(re.search(r.match, m) for m in mods)]


# Expressions allowed in `layers`: integers, i, n, + - * // %, comparisons, and/or/not.
_ALLOWED = (
    ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.BinOp, ast.Add, ast.Sub,
    ast.Mult, ast.FloorDiv, ast.Mod, ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq,
    ast.Name, ast.Load, ast.Constant,
)


def _compile_layer_expr(expr: str):
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"layers {expr!r} is not a valid expression: {e.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ValueError(f"layers {expr!r}: {type(node).__name__} is not allowed (use i, n, integers, + - * // %, comparisons, and/or/not)")
        if isinstance(node, ast.Name) and node.id not in ("i", "n"):
            raise ValueError(f"layers {expr!r}: unknown name {node.id!r} (only i and n)")
        if isinstance(node, ast.Constant) and not (isinstance(node.value, int) and not isinstance(node.value, bool)):
            raise ValueError(f"layers {expr!r}: only integer constants are allowed")
    return compile(tree, "<layers>", "eval")


_EXPR_CACHE: dict[str, Any] = {}


def _eval_layer_expr(expr: str, i: int, n: int) -> bool:
    code = _EXPR_CACHE.get(expr)
    if code is None:
        code = _EXPR_CACHE[expr] = _compile_layer_expr(expr)
    try:
        return bool(eval(code, {"__builtins__": {}}, {"i": i, "n": n}))  # noqa: S307 - AST checked above
    except ZeroDivisionError:
        return False


# mlx_lm.convert.mixed_quant_predicate_builder: "use_more_bits" layers (after llama.cpp's Q4_K_M).
MLX_LM_MORE_BITS = "i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2"


def _mixed(low: int, high: int) -> dict[str, Any]:
    return {
        "name": f"mixed_{low}_{high}",
        "description": f"as mlx_lm's mixed_{low}_{high}: {high}-bit v_proj and down_proj in the 'more bits' layers and lm_head, {low}-bit elsewhere",
        "rules": [
            {"match": r"v_proj|v_a_proj|v_b_proj", "layers": MLX_LM_MORE_BITS, "mode": "affine", "bits": high, "on_indivisible": "keep"},
            {"match": r"down_proj", "layers": MLX_LM_MORE_BITS, "mode": "affine", "bits": high, "on_indivisible": "keep"},
            {"match": r"lm_head", "mode": "affine", "bits": high, "on_indivisible": "keep"},
            {"mode": "affine", "bits": low, "on_indivisible": "keep"},
        ],
    }


# mlx_lm stacks routed experts into SwitchGLU modules: `switch_mlp` in most families, `mlp.experts` in gpt_oss.
_EXPERTS = r"(?:switch_mlp|\.mlp\.experts)\."
# Routed and shared experts (`shared_experts` in DeepSeek, `share_expert` in Step).
_ALL_EXPERTS = r"(?:switch_mlp|\.mlp\.experts|shared_experts|share_expert)\."

PRESETS: dict[str, dict[str, Any]] = {
    "q4q8": {
        "name": "q4q8",
        "description": "routed experts 4-bit affine, every other linear layer and embedding 8-bit, small tensors kept",
        "rules": [
            {"match": _EXPERTS, "mode": "affine", "bits": 4, "on_indivisible": "keep"},
            {"mode": "affine", "bits": 8, "on_indivisible": "keep"},
        ],
    },
    "mixed_2_6": _mixed(2, 6),
    "mixed_3_4": _mixed(3, 4),
    "mixed_3_6": _mixed(3, 6),
    "mixed_4_6": _mixed(4, 6),
    "dq4": {
        "name": "dq4",
        "description": "routed and shared experts 4-bit; their down_proj 6-bit in the first 5 layers and 5-bit every 5th layer; "
                       "all else 8-bit (the published Step-3.7-Flash DQ4 table)",
        "rules": [
            {"match": rf"{_ALL_EXPERTS}down_proj", "layers": "i < 5", "mode": "affine", "bits": 6, "on_indivisible": "keep"},
            {"match": rf"{_ALL_EXPERTS}down_proj", "layers": "i % 5 == 0", "mode": "affine", "bits": 5, "on_indivisible": "keep"},
            {"match": _ALL_EXPERTS, "mode": "affine", "bits": 4, "on_indivisible": "keep"},
            {"mode": "affine", "bits": 8, "on_indivisible": "keep"},
        ],
    },
    "v4_q3": {
        "name": "v4_q3",
        "description": "the published DeepSeek-V4-Flash Q3 bundle's recipe (group 128): routed experts 3-bit, their down_proj "
                       "6-bit in mlx_lm's 'more bits' layers; embedding, head, attention, compressor and indexer, shared "
                       "experts 6-bit",
        "rules": [
            {"match": rf"{_EXPERTS}down_proj", "layers": MLX_LM_MORE_BITS, "mode": "affine", "bits": 6, "group_size": 128,
             "on_indivisible": "keep"},
            {"match": _EXPERTS, "mode": "affine", "bits": 3, "group_size": 128, "on_indivisible": "keep"},
            {"mode": "affine", "bits": 6, "group_size": 128, "on_indivisible": "keep"},
        ],
    },
    "q8_5": {
        "name": "q8_5",
        "description": "routed experts 5-bit affine, all else 8-bit (as the GLM-4.7-Flash 8/5 bundle)",
        "rules": [
            {"match": _EXPERTS, "mode": "affine", "bits": 5, "on_indivisible": "keep"},
            {"mode": "affine", "bits": 8, "on_indivisible": "keep"},
        ],
    },
    "lossless-affine": {
        "name": "lossless-affine",
        "description": "MXFP4 experts to affine 5-bit group 32 without loss (exact route), all else 8-bit",
        "rules": [
            {"source": ["mxfp4"], "mode": "affine", "bits": 5, "group_size": 32, "exact": True},
            {"mode": "affine", "bits": 8, "on_indivisible": "keep"},
        ],
    },
    "mxfp4-experts": {
        "name": "mxfp4-experts",
        "description": "MXFP4 experts repacked losslessly into MLX mxfp4 mode, all else 8-bit affine",
        "rules": [
            {"source": ["mxfp4"], "mode": "mxfp4"},
            {"mode": "affine", "bits": 8, "on_indivisible": "keep"},
        ],
    },
}


def source_recipe(source_bits: int, group_size: int, source_codecs: tuple[str, ...], name: str, other_bits: int = 8) -> Recipe:
    """The recipe behind `mxfp4-to-affine` / `fp8-to-affine`: the named source codecs at `source_bits`,
    every other linear layer and embedding at `other_bits` (group 64), small tensors kept."""
    return Recipe.model_validate(
        {
            "name": name,
            "description": f"{'/'.join(source_codecs)} tensors {source_bits}-bit affine group {group_size}, "
                           f"other linear layers {other_bits}-bit",
            "rules": [
                {"source": list(source_codecs), "mode": "affine", "bits": source_bits, "group_size": group_size, "on_indivisible": "keep"},
                {"mode": "affine", "bits": other_bits, "group_size": 64, "on_indivisible": "keep"},
            ],
        }
    )


def _format_validation_error(e: ValidationError, where: str) -> str:
    lines = []
    for err in e.errors():
        loc = err.get("loc", ())
        path = ""
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            path = f"rule {loc[1] + 1}"
            rest = [str(x) for x in loc[3:]] if len(loc) > 2 and isinstance(loc[2], str) and loc[2].endswith("Rule") else [str(x) for x in loc[2:]]
            if rest:
                path += f" ({'.'.join(rest)})"
        else:
            path = ".".join(str(x) for x in loc) or "recipe"
        got = f", got {err['input']!r}" if err.get("type") == "literal_error" else ""
        lines.append(f"{path}: {err['msg']}{got}")
    return f"{where}: invalid recipe: " + "; ".join(lines)


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise FmtconvError(_format_validation_error(e, where)) from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A preset by name, or a recipe file (TOML primary; JSON accepted)."""
    key = str(name_or_path)
    if key in PRESETS:
        return recipe_from_dict(PRESETS[key], f"preset {key}")
    path = Path(key)
    if not path.is_file():
        raise FmtconvError(f"recipe {key!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSON/TOML decode errors, UnicodeDecodeError
        raise FmtconvError(f"recipe file is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}", file=path) from None
    if not isinstance(data, dict):
        raise FmtconvError(f"recipe file must hold an object with a 'rules' list, got {type(data).__name__}", file=path)
    data.setdefault("name", path.stem)
    return recipe_from_dict(data, str(path))


def describe_presets() -> dict[str, str]:
    return {k: v["description"] for k, v in PRESETS.items()}
