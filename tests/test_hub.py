"""Hub in and out without a network: a pre-filled huggingface_hub cache read offline; upload through a stand-in HfApi."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmtconv.convert.publish.hub import is_repo_id, resolve_source, snapshot_info, upload_bundle
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import INDEX_NAME, save_sharded

REPO = "tiny-org/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*a, **k):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it (its constants are read at import time)."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def _repo_files(tmp: Path) -> dict[str, bytes]:
    """A small checkpoint as a hub repo holds it, plus files a conversion must not download."""
    w = tmp / "w"
    save_sharded(w, {"a.weight": np.arange(4096, dtype=np.float32), "b.weight": np.ones(4096, dtype=np.float32)},
                 max_shard_bytes=20_000)
    files = {p.name: p.read_bytes() for p in w.iterdir()}
    files.update({
        "config.json": b'{"model_type": "tiny"}',
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "chat_template.jinja": b"{{ messages }}",
        "LICENSE": b"MIT",
        "README.md": b"# tiny",
        "original/model.safetensors": b"not needed",
        "pytorch_model.bin": b"not needed",
    })
    return files


def fill_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str = "main") -> Path:
    """Write files into the huggingface_hub cache layout: blobs by hash, snapshot symlinks, refs/<ref>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    for rel, data in files.items():
        # LFS files are stored under their sha256, regular files under their git blob sha1.
        if rel.endswith(".safetensors"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            continue
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


def test_local_directory_passes_through(tmp_path):
    assert resolve_source(tmp_path) == tmp_path
    with pytest.raises(FmtconvError, match="--revision"):
        resolve_source(tmp_path, revision="main")
    with pytest.raises(FmtconvError, match="not a hub repo id"):
        resolve_source(tmp_path / "nope" / "deeper" / "x")


def test_repo_id_detection(tmp_path):
    assert is_repo_id("deepseek-ai/DeepSeek-V3")
    assert not is_repo_id("just-a-name") and not is_repo_id("/abs/path") and not is_repo_id("a/b/c")
    assert snapshot_info(tmp_path / "models--org--na.me" / "snapshots" / COMMIT / "x") == ("org/na.me", COMMIT)
    assert snapshot_info(tmp_path) is None


def test_offline_resolves_from_filled_cache(tmp_path, offline):
    fill_cache(tmp_path / "cache", REPO, COMMIT, _repo_files(tmp_path))
    snap = resolve_source(REPO, cache_dir=tmp_path / "cache")
    assert snap.name == COMMIT and snapshot_info(snap) == (REPO, COMMIT)
    shards = set(json.loads((snap / INDEX_NAME).read_text())["weight_map"].values())
    assert len(shards) == 2 and all((snap / s).is_file() for s in shards)
    assert (snap / "tokenizer.json").is_file() and (snap / "chat_template.jinja").is_file()
    # by commit and by branch name alike
    assert resolve_source(REPO, revision=COMMIT, cache_dir=tmp_path / "cache") == snap


def test_offline_missing_shard_is_a_clear_error(tmp_path, offline):
    snap = fill_cache(tmp_path / "cache", REPO, COMMIT, _repo_files(tmp_path))
    (snap / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FmtconvError, match=r"model-00002-of-00002\.safetensors.*HF_HUB_OFFLINE"):
        resolve_source(REPO, cache_dir=tmp_path / "cache")


def test_offline_repo_not_in_cache(tmp_path, offline):
    with pytest.raises(FmtconvError, match=r"other-org/other@main.*not \(completely\) in the cache"):
        resolve_source("other-org/other", cache_dir=tmp_path / "cache")
    fill_cache(tmp_path / "cache", REPO, COMMIT, _repo_files(tmp_path))
    with pytest.raises(FmtconvError, match="v9"):
        resolve_source(REPO, revision="v9", cache_dir=tmp_path / "cache")


def test_online_download_asks_only_for_needed_files(tmp_path, monkeypatch):
    """The hub's side replaced by a stand-in snapshot_download that filters with huggingface_hub's own matcher."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repo = _repo_files(tmp_path)
    calls = []

    def stand_in(repo_id, *, repo_type, revision, cache_dir, allow_patterns, ignore_patterns, token, local_files_only):
        assert (repo_id, repo_type, local_files_only) == (REPO, "model", False)
        picked = list(filter_repo_objects(repo, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        calls.append((revision, sorted(picked)))
        return str(fill_cache(Path(cache_dir), repo_id, COMMIT, {f: repo[f] for f in picked}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stand_in)
    snap = resolve_source(REPO, cache_dir=tmp_path / "cache")
    (rev1, first), (rev2, second) = calls
    assert rev1 is None and rev2 == COMMIT  # the shards come from the commit the first step resolved
    assert INDEX_NAME in first and "config.json" in first and "tokenizer.json" in first and "LICENSE" in first
    assert not any(f.endswith((".safetensors", ".bin")) for f in first)
    assert second == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (snap / "model-00002-of-00002.safetensors").is_file() and not (snap / "original").exists()


def test_env_offline_standard_cache_in_a_fresh_process(tmp_path):
    """HF_HUB_OFFLINE=1 in the environment and the standard cache (HF_HUB_CACHE), as a user runs it."""
    fill_cache(tmp_path / "hub", REPO, COMMIT, _repo_files(tmp_path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    code = ("import socket\n"
            "def refuse(*a, **k): raise SystemExit('network')\n"
            "socket.socket.connect = refuse\n"
            "from fmtconv.convert.publish.hub import resolve_source\n"
            f"print(resolve_source({REPO!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "hub" / "models--tiny-org--tiny-model" / "snapshots" / COMMIT


class StandInApi:
    """Records calls at the HfApi boundary (create_repo + upload_large_folder, as in huggingface_hub 0.25-1.x)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_large_folder(self, **kw):
        self.calls.append(("upload_large_folder", kw))


class StandInApi2:
    """huggingface_hub 2.x: no upload_large_folder; upload_folder batches and resumes."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


def _bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    save_sharded(out, {"norm.weight": np.ones(8, dtype=np.float32)})
    (out / "config.json").write_text('{"model_type": "tiny"}')
    return out


@pytest.mark.parametrize("api_cls,method", [(StandInApi, "upload_large_folder"), (StandInApi2, "upload_folder")])
def test_upload_creates_repo_then_uploads_folder(tmp_path, api_cls, method):
    out = _bundle(tmp_path)
    api = api_cls()
    url = upload_bundle(out, "me/tiny-mlx", api=api, private=True)
    assert url == "https://huggingface.co/me/tiny-mlx"
    (n1, c1), (n2, c2) = api.calls
    assert n1 == "create_repo" and c1["repo_id"] == "me/tiny-mlx" and c1["exist_ok"] is True and c1["repo_type"] == "model"
    assert n2 == method and c2["repo_id"] == "me/tiny-mlx" and Path(c2["folder_path"]) == out and c2["repo_type"] == "model"
    assert "fmtconv-manifest.json" in c2["ignore_patterns"]


def test_upload_refuses_a_bundle_that_fails_verify(tmp_path):
    out = _bundle(tmp_path)
    (out / "model-00001-of-00001.safetensors").unlink()
    api = StandInApi()
    with pytest.raises(FmtconvError, match="not uploading.*missing"):
        upload_bundle(out, "me/tiny-mlx", api=api)
    assert api.calls == []
