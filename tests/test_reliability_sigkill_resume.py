"""Reliability class 12: SIGKILL at random points of a conversion, several times, then resume: the final
bundle is byte-identical to an uninterrupted run, OUT never appears before it is complete, and shards
finished before a kill are kept (same inode) rather than rewritten."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import reliability_helpers as rh
from fmtconv.convert.pipeline import MANIFEST

SHARD_CAP = "20KB"  # deepseek-v4-tiny -> 27 output shards
KILLS = 5
# Kill points differ per run; a failure names its seed, and FMTCONV_KILL_SEED=<seed> replays it.
SEED = int(os.environ.get("FMTCONV_KILL_SEED") or random.SystemRandom().randrange(2**32))


def _args(src: Path, out: Path) -> list[str]:
    return [*rh.CLI, "mxfp4-to-affine", str(src), str(out), "--quiet", "--max-shard-size", SHARD_CAP, "--workers", "2"]


def _recorded(partial: Path) -> dict[str, str]:
    try:
        return json.loads((partial / MANIFEST).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}


def test_sigkill_at_random_points_then_resume(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    before = rh.tree_hashes(src)
    ref = tmp_path / "ref" / "out"
    ref.parent.mkdir()
    subprocess.run(_args(src, ref), check=True, cwd=rh.REPO)
    expected = rh.tree_bytes(ref)
    n_shards = len([n for n in expected if n.endswith(".safetensors")])
    assert n_shards >= 20

    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    partial = rh.partial_of(out)
    rng = random.Random(SEED)
    killed: list[tuple[int, int]] = []  # (shards recorded when the kill was aimed, shards recorded after it)
    kept_inodes: dict[str, int] = {}
    for k in range(KILLS):
        done = len(_recorded(partial))
        # Aim at a random later shard (the last kill may land in the final index/config/rename phase).
        target = rng.randint(done, n_shards - (0 if k == KILLS - 1 else 1))
        proc = subprocess.Popen(_args(src, out), cwd=rh.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if partial.is_dir() and len(_recorded(partial)) >= target:
                break
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.003))
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        proc.stderr.close()
        if rc != -signal.SIGKILL:  # it finished before the kill landed
            assert rc == 0
            break
        killed.append((target, len(_recorded(partial))))
        # A killed run never leaves a complete-looking OUT.
        assert not out.exists(), f"seed {SEED}"
        for name in _recorded(partial):
            kept_inodes.setdefault(name, (partial / name).stat().st_ino)
    why = f"seed {SEED}, kills (aimed at shard, recorded after): {killed}"
    assert len(killed) >= 3, why
    assert any(after > 0 for _, after in killed), why  # some kills landed after finished shards

    if not out.exists():
        proc = subprocess.run(_args(src, out), cwd=rh.REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert not partial.exists()
    assert rh.tree_bytes(out) == expected, f"seed {SEED}"
    resumed = {n: (out / n).stat().st_ino for n in kept_inodes}
    assert resumed == kept_inodes, f"seed {SEED}"  # shards finished before a kill were verified and kept, not rewritten
    assert rh.tree_hashes(src) == before
