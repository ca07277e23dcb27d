"""The Hugging Face Hub in and out: a SRC that is a repo id becomes a cached snapshot; a verified bundle goes up.

Download: `huggingface_hub.snapshot_download` into the standard cache (or `cache_dir`), in two
steps pinned to one commit: first the small files (config, index, tokenizer, templates, code,
licence), then exactly the shards the index names, so repos that also carry `original/` or
consolidated weights cost nothing extra.  Interrupted downloads resume (huggingface_hub keeps
`.incomplete` blobs); with `HF_HUB_OFFLINE=1` the same calls resolve from the cache.
Upload: `HfApi.create_repo(exist_ok=True)`, then `upload_large_folder` (huggingface_hub 0.25-1.x:
resumable, many commits) or, where that no longer exists (2.x), `upload_folder`, which there
batches commits and resumes by itself.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any

from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import INDEX_NAME

# Everything a conversion reads or copies into the bundle, weights aside.
SIDE_FILE_PATTERNS = [
    "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "*.md", "LICENSE*", "*.tokenizer", "*.vocab",
]
WEIGHT_PATTERNS = ["*.safetensors"]
DEFAULT_ALLOW_PATTERNS = SIDE_FILE_PATTERNS + WEIGHT_PATTERNS
# Duplicates of the weights in other layouts (gpt-oss ships original/ and metal/), and pickles.
DEFAULT_IGNORE_PATTERNS = ["original/*", "metal/*", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]
# Bundle files that must not be uploaded: the converter's work files.
UPLOAD_IGNORE_PATTERNS = ["*.tmp", "*.partial", "*.partial/*", ".fmtconv.lock", "fmtconv-manifest.json"]
# huggingface_hub cache layout (huggingface_hub docs, "Understand caching"):
# <cache>/models--<org>--<name>/{blobs/, refs/<branch>, snapshots/<commit>/<files>}.
_SNAPSHOT = re.compile(r"^models--(?P<repo>.+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_repo_id(src: str) -> bool:
    """`org/name` that is not an existing local path."""
    return bool(_REPO_ID.match(src)) and not Path(src).expanduser().exists() and "--" not in src and ".." not in src


def snapshot_info(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) when `path` lies in a hub cache snapshot (`models--org--name/snapshots/<commit>`)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2):
        m = _SNAPSHOT.match(parts[i])
        if m and parts[i + 1] == "snapshots" and _COMMIT.match(parts[i + 2]):
            return m.group("repo").replace("--", "/"), parts[i + 2]
    return None


def resolve_source(
    src: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    allow_patterns: list[str] | None = None,
    *,
    ignore_patterns: list[str] | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local directory as is; a hub repo id `org/name` downloaded (only what conversion needs) -> snapshot dir.

    allow_patterns: None downloads the side files, then exactly the shards the index lists; a list
    downloads just those patterns in one call.  Raises FmtconvError naming the repo and revision.
    """
    p = Path(src).expanduser()
    if p.exists():
        if revision is not None:
            raise FmtconvError("--revision applies to hub repo ids, not to a local directory", file=p)
        return p
    s = str(src)
    if not is_repo_id(s):
        raise FmtconvError("does not exist, and is not a hub repo id of the form org/name", file=p)
    ignore = DEFAULT_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns
    where = f"{s}@{revision or 'main'}"
    if allow_patterns is not None:
        return _download(s, where, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns,
                         ignore_patterns=ignore, token=token)
    snap = _download(s, where, revision=revision, cache_dir=cache_dir, allow_patterns=SIDE_FILE_PATTERNS,
                     ignore_patterns=ignore, token=token)
    info = snapshot_info(snap)
    commit = info[1] if info else revision  # pin the second step to the commit the first one resolved
    index = snap / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FmtconvError(f"index of {where} is not a weight_map JSON ({e})", file=index) from None
        patterns = [glob.escape(f) for f in shards]
    else:
        shards, patterns = [], WEIGHT_PATTERNS
    snap = _download(s, where, revision=commit, cache_dir=cache_dir, allow_patterns=patterns, ignore_patterns=ignore, token=token)
    missing = [f for f in shards if not (snap / f).is_file()]
    if missing:
        raise FmtconvError(f"{len(missing)} shard(s) of {where} are not in the cache (e.g. {missing[0]}) and could not be "
                           "downloaded; run again online (unset HF_HUB_OFFLINE) to complete the download", file=snap)
    if not shards and not any(snap.glob("*.safetensors")):
        raise FmtconvError(f"{where} has no .safetensors weights", file=snap)
    return snap


def _download(repo_id: str, where: str, **kw: Any) -> Path:
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # Offline, say so explicitly: huggingface_hub 1.x lists the repo tree for a commit-hash revision
        # unless local_files_only is set, and fails offline even with a complete cache.
        return Path(snapshot_download(repo_id, repo_type="model", local_files_only=is_offline_mode(), **kw))
    except GatedRepoError as e:
        raise FmtconvError(f"{where} is gated: accept its licence on the hub and log in (hf auth login) ({e})") from None
    except RepositoryNotFoundError as e:
        raise FmtconvError(f"hub repo {repo_id} not found, or private without a valid token ({e})") from None
    except RevisionNotFoundError as e:
        raise FmtconvError(f"revision of {where} not found on the hub ({e})") from None
    except LocalEntryNotFoundError as e:
        raise FmtconvError(f"{where} is not (completely) in the cache and the hub cannot be reached "
                           f"(offline or HF_HUB_OFFLINE=1): {e}") from None
    except (HfHubHTTPError, HFValidationError, ConnectionError) as e:
        raise FmtconvError(f"download of {where} failed: {e}") from None


def upload_bundle(
    out_dir: str | Path,
    repo_id: str,
    api: Any = None,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    verify: bool = True,
) -> str:
    """Upload a bundle to `repo_id` (created if missing) after `verify_bundle` finds no problem; returns the repo URL.

    api: an `huggingface_hub.HfApi` (default: a new one, token from the usual places) or any
    object with the same `create_repo` and `upload_large_folder` / `upload_folder` methods.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FmtconvError("bundle to upload is not a directory", file=out)
    if not _REPO_ID.match(repo_id):
        raise FmtconvError(f"upload repo must be of the form org/name, got {repo_id!r}")
    if verify:
        from fmtconv.convert.check.verify import verify_bundle

        report = verify_bundle(out)
        if not report.ok:
            shown = "; ".join(report.problems[:5]) + (f"; ... ({len(report.problems) - 5} more)" if len(report.problems) > 5 else "")
            raise FmtconvError(f"not uploading: verify found {len(report.problems)} problem(s): {shown}", file=out)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        common = {"repo_id": repo_id, "folder_path": str(out), "repo_type": "model", "revision": revision,
                  "ignore_patterns": UPLOAD_IGNORE_PATTERNS}
        if hasattr(api, "upload_large_folder"):
            api.upload_large_folder(**common, private=private)
        else:
            api.upload_folder(**common, commit_message=commit_message or f"Upload {out.name} (fmtconv)")
    except HfHubHTTPError as e:
        raise FmtconvError(f"upload to {repo_id} failed: {e}", file=out) from None
    return str(url)


__all__ = [
    "DEFAULT_ALLOW_PATTERNS",
    "DEFAULT_IGNORE_PATTERNS",
    "SIDE_FILE_PATTERNS",
    "UPLOAD_IGNORE_PATTERNS",
    "is_repo_id",
    "resolve_source",
    "snapshot_info",
    "upload_bundle",
]
