"""The bundle's README.md: source, recipe, per-module-pattern table, bit distribution, size, verify summary.

Everything in the tables is read back from what was written (config.json's `quantization` block and
the shard headers), not from the plan, so the card describes the bundle as its runtime's loader sees it.
Front matter keys follow the Hub's model card metadata (huggingface_hub `ModelCardData`:
library_name, pipeline_tag, base_model, tags), as mlx_lm.utils.create_model_card sets them.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmtconv import __version__
from fmtconv.convert.units import human_bytes
from fmtconv.convert.check.verify import ModuleEntry, bundle_modules, open_bundle, pattern_table, quant_block
from fmtconv.formats.safetensors_io import TensorInfo

README = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FIRST_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.)")


@dataclass
class FilesInfo:
    """What the card needs from disk: every file's size and every stored tensor's header entry."""

    sizes: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def shard_bytes(self) -> int:
        return sum(v for k, v in self.sizes.items() if k.endswith(".safetensors"))

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def shards(self) -> int:
        return sum(k.endswith(".safetensors") for k in self.sizes)


def files_info(out_dir: str | Path) -> FilesInfo:
    """Scan a written bundle (headers only, no tensor data)."""
    b = open_bundle(out_dir)
    try:
        return FilesInfo({k: v for k, v in b.file_sizes().items() if k != README}, dict(b.tensors))
    finally:
        b.close()


def _human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _ranges(xs: list[int]) -> str:
    """[0,1,2,4,5,9] -> '0-2, 4-5, 9'."""
    xs = sorted(set(xs))
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def _layers_by_row(entries: list[ModuleEntry]) -> dict[tuple, str]:
    """For each table row key, the layer indices (first numeric path component) its modules sit in."""
    layers: dict[tuple, list[int]] = defaultdict(list)
    for e in entries:
        m = _FIRST_INDEX.search(e.name)
        if m:
            layers[(e.pattern, e.mode, e.bits, e.group_size, e.dtype)].append(int(m.group(1)))
    return {k: _ranges(v) for k, v in layers.items()}


def _fmt_db(x: Any) -> str:
    if isinstance(x, str):
        return x
    return "exact" if math.isinf(x) and x > 0 else f"{x:.2f}"


_ENCODER_TEXT = {
    "minmax": "minmax (MLX's own min/max scales and biases, bit-exact with `mx.quantize`)",
    "mse": "mse (scales and biases fitted to minimise each group's squared error; plain MLX affine, same size)",
}


def encoder_summary(config: Mapping[str, Any]) -> str | None:
    """Which affine encoder wrote the bundle, from config.json's `fmtconv` record (None: no record, no affine module)."""
    prov = config.get("fmtconv") if isinstance(config.get("fmtconv"), Mapping) else None
    if not prov or "encoder" not in prov:
        return None
    used = prov.get("encoders") or {}
    names = sorted(set(used.values())) or [prov["encoder"]]
    if len(names) == 1:
        return _ENCODER_TEXT.get(names[0], names[0])
    return "; ".join(f"{_ENCODER_TEXT.get(n, n)}: " + ", ".join(f"`{p}`" for p, e in sorted(used.items()) if e == n)
                     for n in names)


def render_model_card(
    config: Mapping[str, Any],
    source: str | None,
    recipe_name: str | None,
    verify_summary: Mapping[str, Any] | None,
    files_info: FilesInfo,
    *,
    revision: str | None = None,
    title: str | None = None,
    repo_id: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
    pair: str | None = None,
) -> str:
    """README.md text for a bundle (`evaluation`: the `fmtconv eval` report's JSON, when the bundle was evaluated).

    config: the written config.json; files_info: `files_info(out_dir)`; verify_summary:
    `VerifyReport.summary_json()` or None (not verified); repo_id: where the bundle will live
    (used in the snippet; else the title); pair: the folder name of the other bundle of a main model +
    drafter pair (`--mtp`), for the speculative-decoding snippet.
    """
    entries = bundle_modules(config, files_info.tensors)
    rows = pattern_table(entries)
    layers = _layers_by_row(entries)
    params = sum(e.params for e in entries)
    nbytes = sum(e.nbytes for e in entries)
    bpw = nbytes * 8 / params if params else 0.0
    default, overrides, _ = quant_block(config)
    name = title or repo_id or (source.rstrip("/").split("/")[-1] + "-mlx" if source else "MLX bundle")
    is_hub = bool(source and _HUB_ID.match(source) and not Path(source).exists())

    out: list[str] = ["---", "library_name: mlx", "pipeline_tag: text-generation"]
    if is_hub:
        out.append(f"base_model: {source}")
    out += ["tags:", "- mlx", "- fmtconv", "- quantized", "---", "", f"# {name}", ""]
    src_txt = f"[{source}](https://huggingface.co/{source})" if is_hub else (f"`{source}`" if source else "an unrecorded source")
    rev_txt = f" at revision `{revision}`" if revision else ""
    recipe_txt = f" with the recipe `{recipe_name}`" if recipe_name else ""
    out += [f"This MLX bundle was converted from {src_txt}{rev_txt} by fmtconv {__version__}{recipe_txt}.", ""]

    out += ["| | |", "|---|---|",
            f"| Size on disk | {human_bytes(files_info.shard_bytes)} in {files_info.shards} shard(s) "
            f"({human_bytes(files_info.total_bytes)} with side files) |",
            f"| Parameters | {_human_count(params)} ({params}) |",
            f"| Effective bits per weight | {bpw:.3f} |"]
    if default is not None:
        out.append(f"| Default quantization | {default.mode}, {default.bits} bits, group size {default.group_size} "
                   f"({len(overrides)} per-module override(s)) |")
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype:
        out.append(f"| Compute dtype | {dtype} |")
    runtime = _runtime_of(config)
    check = (config.get("fmtconv") or {}).get("runtime_check") or {}
    out.append(f"| Runtime | {runtime}" + (f" (`{check['model_module']}`)" if check.get("model_module") else "")
               + (f"; fmtconv's check against {runtime} {check.get('version')}'s model class: {check['result']}" if check.get("result") else "")
               + " |")
    enc = encoder_summary(config)
    if enc:
        out.append(f"| Affine encoder | {enc} |")
    fit = (config.get("fmtconv") or {}).get("fit")
    if isinstance(fit, Mapping):
        out.append(f"| Allocation | fmtconv `--fit`: budget {human_bytes(fit['budget_bytes'])}, planned "
                   f"{human_bytes(fit['planned_bytes'])}, predicted KL {fit['predicted_kl']:.5f} nats/token from measured "
                   "sensitivities; the recipe is `fit-recipe.toml` |")
    out.append("")

    out += ["## Modules", "",
            "Module patterns (layer and expert indices as `{i}`) as written in `config.json` and the shards; "
            "Dtype is that of the scales for quantized modules and of the tensor for dense ones.", "",
            "| Module pattern | Mode | Bits | Group | Dtype | Layers | Count | Parameters | Size |",
            "|---|---|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        k = (r["pattern"], r["mode"], r["bits"], r["group_size"], r["dtype"])
        out.append(f"| `{r['pattern']}` | {r['mode']} | {r['bits'] if r['bits'] is not None else ''} | "
                   f"{r['group_size'] if r['group_size'] is not None else ''} | {r['dtype']} | {layers.get(k, '')} | "
                   f"{r['count']} | {_human_count(r['params'])} | {human_bytes(r['bytes'])} |")
    out.append("")

    dist: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in entries:
        dist[e.label][0] += e.params
        dist[e.label][1] += e.nbytes
    out += ["## Bit distribution", "", "| Precision | Parameters | Share | Size |", "|---|---:|---:|---:|"]
    for label, (p, b) in sorted(dist.items(), key=lambda kv: -kv[1][0]):
        out.append(f"| {label} | {_human_count(p)} | {100 * p / params if params else 0:.1f}% | {human_bytes(b)} |")
    out.append("")

    out += ["## Verification", ""]
    if verify_summary is None:
        out += ["Not verified; run `fmtconv verify` on this folder.", ""]
    else:
        status = "passed" if verify_summary.get("ok") else f"found {verify_summary.get('problems')} problem(s)"
        out += [f"`fmtconv verify` {status}: {verify_summary.get('modules', 0)} quantized modules, "
                f"{verify_summary.get('tensors', 0)} weights checked for structure, shapes and finite scales.", ""]
        pats = verify_summary.get("patterns") or []
        if pats:
            out += [f"Against the source ({verify_summary.get('compared', 0)} tensors decoded to float32 on both sides):", "",
                    "| Module pattern | Kind | Count | Min SQNR (dB) | Median SQNR (dB) | Max abs error |",
                    "|---|---|---:|---:|---:|---:|"]
            for s in pats:
                err = s["max_abs_error"]
                out.append(f"| `{s['pattern']}` | {s['kind']} | {s['count']} | {_fmt_db(s['min_sqnr_db'])} | "
                           f"{_fmt_db(s['median_sqnr_db'])} | {err if isinstance(err, str) else f'{err:.3g}'} |")
            out.append("")
            if verify_summary.get("outliers"):
                out += [f"Below the SQNR threshold: {', '.join(f'`{n}`' for n in verify_summary['outliers'])}.", ""]

    if evaluation:
        out += _evaluation_section(evaluation)

    target = repo_id or "path/to/this/folder"
    draft_kind = (config.get("fmtconv") or {}).get("draft_kind")
    if draft_kind is not None:
        out += _drafter_usage(config, main=f"path/to/{pair}" if pair else "path/to/the/main/model", draft=target, kind=draft_kind)
    elif runtime == "vmlx":
        out += ["## Use with vMLX", "",
                "vMLX runs this bundle with jang's DeepSeek-V4 model, through its plain mlx-lm route (the bundle has no "
                "`jang_config.json`); its OpenAI-compatible server:", "",
                "```bash", "pip install vmlx", f"vmlx serve {target} --port 8000", "```", "",
                "or its loader, in Python:", "", "```python",
                "from vmlx_engine.utils.tokenizer import load_model_with_fallback", "",
                f'model, tokenizer = load_model_with_fallback("{target}")', "```", ""]
    elif runtime == "mlx-vlm":
        out += ["## Use with mlx-vlm", "", "```bash", "pip install mlx-vlm", "```", "", "```python",
                "from mlx_vlm import generate, load", "", f'model, processor = load("{target}")',
                'print(generate(model, processor, "hello", max_tokens=100).text)', "```", ""]
    else:
        out += ["## Use with mlx-lm", "", "```bash", "pip install mlx-lm", "```", "", "```python",
                "from mlx_lm import load, generate", "", f'model, tokenizer = load("{target}")',
                'messages = [{"role": "user", "content": "hello"}]',
                "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
                "print(generate(model, tokenizer, prompt=prompt, max_tokens=100))", "```", ""]
    if draft_kind is None and pair:
        out += ["## Speculative decoding", "",
                f"The model's multi-token-prediction layer was converted beside it, as the drafter bundle `{pair}`.", ""]
        out += _speculative_snippets(target, f"path/to/{pair}", "mtp")
    return "\n".join(out)


def _drafter_usage(config: Mapping[str, Any], main: str, draft: str, kind: str) -> list[str]:
    """The drafter bundle's usage: what it is, and mlx-vlm's speculative decoding with the main model."""
    text = config.get("text_config") or {}
    return ["## Use as a speculative-decoding drafter with mlx-vlm", "",
            f"This bundle is the multi-token-prediction layer of a `{text.get('model_type', 'model')}` release, for "
            f"mlx-vlm's `{config.get('model_type')}` drafter. It has no embedding or head of its own: it borrows the main "
            "model's, drafts tokens, and the main model verifies them, so greedy output is the main model's own, token for token.",
            ""] + _speculative_snippets(main, draft, kind)


def _speculative_snippets(main: str, draft: str, kind: str) -> list[str]:
    return ["```bash", "pip install mlx-vlm",
            f'python -m mlx_vlm generate --model {main} --draft-model {draft} --draft-kind {kind} --prompt "hello" --max-tokens 100',
            "```", "", "```python", "from mlx_vlm import generate, load", "from mlx_vlm.speculative.drafters import load_drafter", "",
            f'model, processor = load("{main}")', f'draft_model, draft_kind = load_drafter("{draft}", kind="{kind}")',
            'print(generate(model, processor, "hello", max_tokens=100, draft_model=draft_model, draft_kind=draft_kind).text)',
            "```", ""]


def _evaluation_section(r: Mapping[str, Any]) -> list[str]:
    f = lambda x, d=4: f"{x:.{d}f}" if isinstance(x, (int, float)) else str(x)  # noqa: E731
    out = ["## Quality against the source", "",
           f"`fmtconv eval` ran the source, decoded exactly ({r.get('teacher_dtype')}), and this bundle "
           f"({r.get('student_dtype')} activations) through `{r.get('model_module')}` on {r.get('tokens')} tokens "
           f"({r.get('tokens_source')}).", "",
           "| KL mean (nats/token) | KL p99 | Top-1 agreement | Top-5 | Perplexity, source → bundle |",
           "|---:|---:|---:|---:|---|",
           f"| {f(r.get('kl_mean'), 5)} | {f(r.get('kl_p99'), 5)} | {f(r.get('top1'))} | {f(r.get('top5'))} | "
           f"{f(r.get('ppl_teacher'), 3)} → {f(r.get('ppl_student'), 3)} |", ""]
    worst = r.get("worst_layers") or {}
    if worst:
        out += ["Largest relative output error of a decoder layer with one module class quantized (teacher's input):", "",
                "| Module class | Layers (error) |", "|---|---|"]
        out += [f"| {cls} | " + ", ".join(f"{w['layer']} ({f(w['rel_error'])})" for w in rows) + " |" for cls, rows in worst.items()]
        out.append("")
    return out


def is_fmtconv_card(out_dir: str | Path) -> bool:
    """Whether the bundle's README.md is a card fmtconv wrote (not a copied source card)."""
    try:
        return "\n- fmtconv\n" in (Path(out_dir) / README).read_text()
    except (OSError, UnicodeDecodeError):
        return False


def _runtime_of(config: Mapping[str, Any]) -> str:
    """The runtime the bundle was written for (config.json's fmtconv block), else the model_type's owner."""
    from fmtconv.convert.runtimes import owner_of

    return (config.get("fmtconv") or {}).get("runtime") or owner_of(config.get("model_type")).name


def write_model_card(
    out_dir: str | Path,
    plan: Any = None,
    *,
    source: str | None = None,
    recipe_name: str | None = None,
    verify_summary: Mapping[str, Any] | None = None,
    revision: str | None = None,
    repo_id: str | None = None,
    run_verify: bool = True,
    pair: str | None = None,
) -> Path:
    """Render README.md into a written bundle (config, index and shards in place).

    Source and recipe come from `plan` (fmtconv.convert.plan.Plan) when given, else from the
    arguments, else from config.json's "fmtconv" provenance record.  With run_verify and no
    verify_summary, the structural verify runs first and its summary goes into the card.
    """
    import json

    from fmtconv.convert.check.verify import verify_bundle

    out = Path(out_dir)
    config = json.loads((out / "config.json").read_text())
    prov = config.get("fmtconv") if isinstance(config.get("fmtconv"), dict) else {}
    if plan is not None:
        source = source or str(plan.source)
        recipe_name = recipe_name or plan.recipe.name
    source = source or prov.get("source")
    recipe_name = recipe_name or prov.get("recipe")
    revision = revision or prov.get("revision")
    if source:  # a hub download: name the repo and commit, not the cache path
        from fmtconv.convert.publish.hub import snapshot_info

        snap = snapshot_info(source)
        if snap is not None:
            source, revision = snap[0], revision or snap[1]
    if verify_summary is None and run_verify:
        verify_summary = verify_bundle(out).summary_json()
    from fmtconv.convert.check.eval import read_report

    text = render_model_card(config, source, recipe_name, verify_summary, files_info(out), revision=revision,
                             title=out.name.removesuffix(".partial"), repo_id=repo_id, evaluation=read_report(out), pair=pair)
    path = out / README
    tmp = path.with_name(README + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


__all__ = ["FilesInfo", "README", "files_info", "is_fmtconv_card", "render_model_card", "write_model_card"]
