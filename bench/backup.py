"""Backup benchmark: a first and an unchanged second snapshot of a mixed tree, against
`tar | zstd -T0` on the same tree in the same run.

    .venv/bin/python bench/backup.py [--gb 2] [--dir DIR] [--rounds 1]

The tree (default 2 GiB, generated once per seed into DIR and reused) mixes what a
tenant holds: JSON-lines raw events (compressible text, every line different), gzipped
raw drops and Parquet-like binary (incompressible), many small files, and a few exact
copies. Everything is generated from a seeded RNG, so nothing repeats by accident
except the deliberate copies. Both sides read a warm page cache (a warm-up pass reads
the tree first) and write to the same disk, each after a sync, so neither pays for the
other's write-back. With --rounds N the sides alternate and each reports its best.

Last line, one JSON object: bytes, files, first_s, second_s, baseline_s, ratio
(first_s / baseline_s), incremental_speedup (first_s / second_s), dedup_ratio (logical
bytes / bytes the first snapshot stored), baseline_bytes, stored_bytes; and for a backup
killed (SIGKILL) once half its batches were stored and then run again:
resume_batches, resume_killed_after_batches and resume_read_again_share (bytes the
second run read over the tree's bytes; ≤ 0.6 is the target).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TENANT = "bench"


def _text(rng: np.random.Generator, size: int) -> bytes:
    """JSON lines like raw listening events, every line distinct."""
    lines = []
    total = 0
    users = rng.integers(0, 50_000, size // 60 + 100)
    tracks = rng.integers(0, 2_000_000, users.size)
    ms = rng.integers(0, 400_000, users.size)
    ts = rng.integers(1_700_000_000, 1_760_000_000, users.size)
    for i in range(users.size):
        line = (
            f'{{"event_id":"{ts[i]:x}{i:08x}","user_id":"u{users[i]}","track_id":"t{tracks[i]}",'
            f'"ts":{ts[i]},"ms_played":{ms[i]},"device":"{"ios" if ms[i] & 1 else "web"}"}}\n'
        )
        lines.append(line)
        total += len(line)
        if total >= size:
            break
    return "".join(lines).encode()[:size]


def generate(root: Path, gib: float, seed: int = 20261201) -> Path:
    tree = root / "tenants" / TENANT
    stamp = root / f".complete-{gib}-{seed}"
    if stamp.exists():
        return tree
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    budget = int(gib * 1024**3)
    plan = [  # (share, kind)
        (0.40, "jsonl"),
        (0.15, "gzip"),
        (0.25, "parquet"),
        (0.10, "small"),
        (0.10, "copy"),
    ]
    written: list[Path] = []
    for share, kind in plan:
        left = int(budget * share)
        n = 0
        while left > 0:
            if kind == "small":
                size = int(rng.integers(2_000, 64_000))
                data = _text(rng, size) if n % 2 else rng.bytes(size)
                path = tree / "models" / f"m{n // 500:03d}" / f"f{n:06d}.bin"
            elif kind == "copy":
                src = written[int(rng.integers(0, len(written)))]
                size = src.stat().st_size
                path = tree / "exports" / f"copy-{n:04d}-{src.name}"
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, path)
                left -= size
                n += 1
                continue
            else:
                size = int(rng.integers(8, 96) * 1024 * 1024)
                if kind == "jsonl":
                    data = _text(rng, size)
                    path = tree / "raw" / f"d{n:04d}.jsonl"
                elif kind == "gzip":
                    data = gzip.compress(_text(rng, size * 4), compresslevel=1)[:size]
                    path = tree / "raw" / f"drop-{n:04d}.jsonl.gz"
                else:
                    data = rng.bytes(size)
                    path = tree / "curated" / "events" / f"part-{n:04d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if kind != "small":
                written.append(path)
            left -= len(data)
            n += 1
    stamp.touch()
    return tree


def tree_size(tree: Path) -> tuple[int, int]:
    files = [p for p in tree.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def baseline(tree: Path, out: Path) -> tuple[float, int]:
    target = out / "baseline.tar.zst"
    os.sync()  # each side starts with no other side's dirty pages to write back
    start = time.perf_counter()
    tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(tree), "."], stdout=subprocess.PIPE)
    subprocess.run(["zstd", "-T0", "-q", "-f", "-o", str(target)], stdin=tar.stdout, check=True)
    tar.stdout.close()
    if tar.wait() != 0:
        raise RuntimeError("tar failed")
    seconds = time.perf_counter() - start
    size = target.stat().st_size
    target.unlink()
    return seconds, size


def setlist_backup(root: Path, out: Path) -> tuple[float, float, int, dict]:
    from setlist.backup.repository import BackupKey, open_repository
    from setlist.backup.snapshots import create_snapshot
    from setlist.core.storage import LocalTenantStorage

    repo_root = out / "repo"
    shutil.rmtree(repo_root, ignore_errors=True)
    data = LocalTenantStorage(TENANT, root)
    key = BackupKey.generate()[0]
    repo = open_repository(LocalTenantStorage(TENANT, repo_root), key, create=True)
    os.sync()
    start = time.perf_counter()
    first = create_snapshot(data, repo)
    first_s = time.perf_counter() - start
    repo = open_repository(LocalTenantStorage(TENANT, repo_root), key)
    os.sync()
    start = time.perf_counter()
    second = create_snapshot(data, repo)
    second_s = time.perf_counter() - start
    stored = first.new_bytes + first.manifest_bytes
    shutil.rmtree(repo_root, ignore_errors=True)
    return (
        first_s,
        second_s,
        stored,
        {"second_new_bytes": second.new_bytes + second.manifest_bytes, "files": first.files},
    )


_KILLED_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from setlist.backup.repository import BackupKey, open_repository
from setlist.backup.snapshots import create_snapshot
from setlist.core.storage import LocalTenantStorage
key = BackupKey.from_text(sys.stdin.readline().strip())
repo = open_repository(LocalTenantStorage({tenant!r}, Path({repo!r})), key)
create_snapshot(LocalTenantStorage({tenant!r}, Path({data!r})), repo, batch_bytes={batch})
"""


def resumed_backup(root: Path, out: Path, batch_bytes: int) -> dict:
    """A first backup killed (SIGKILL) once half its batches are checkpointed, then run
    again: the share of the tree the second run reads (the unfinished half, plus the
    batch that was under way)."""
    from setlist.backup.repository import BackupKey, open_repository
    from setlist.backup.snapshots import create_snapshot, plan_snapshot
    from setlist.core.storage import LocalTenantStorage

    repo_root = out / "repo-resume"
    shutil.rmtree(repo_root, ignore_errors=True)
    data = LocalTenantStorage(TENANT, root)
    key, text = BackupKey.generate()
    repo = open_repository(LocalTenantStorage(TENANT, repo_root), key, create=True)
    batches = len(plan_snapshot(data, repo, batch_bytes=batch_bytes).batches)
    script = _KILLED_CHILD.format(
        root=str(ROOT), tenant=TENANT, repo=str(repo_root), data=str(root), batch=batch_bytes
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, text=True)
    child.stdin.write(text + "\n")
    child.stdin.flush()
    checkpoints = repo_root / "tenants" / TENANT / "checkpoints"
    while child.poll() is None:
        done = len(list(checkpoints.glob("*"))) if checkpoints.is_dir() else 0
        if done >= batches / 2:
            child.kill()
            break
        time.sleep(0.02)
    child.wait()
    killed_after = len(list(checkpoints.glob("*"))) if checkpoints.is_dir() else 0
    repo = open_repository(LocalTenantStorage(TENANT, repo_root), key)
    again = create_snapshot(data, repo, batch_bytes=batch_bytes)
    shutil.rmtree(repo_root, ignore_errors=True)
    return {
        "resume_batches": batches,
        "resume_killed_after_batches": killed_after,
        "resume_read_again_share": round(again.bytes_read / max(1, again.bytes), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="tree size in GiB")
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()) / "setlist-bench-backup"
    )
    parser.add_argument("--rounds", type=int, default=1, help="best of N alternating rounds")
    parser.add_argument(
        "--batch-mb", type=float, default=256, help="backup batch size for the resume case"
    )
    args = parser.parse_args()
    if not shutil.which("zstd"):
        sys.exit("the baseline needs the zstd command (Debian package zstd)")
    data_root = args.dir / "data"
    tree = generate(data_root, args.gb)
    logical, files = tree_size(tree)
    out = args.dir / "out"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-cf", "/dev/null", "-C", str(tree), "."], check=True)  # warm-up
    base_s, first_s, second_s = [], [], []
    for _ in range(args.rounds):
        b, base_bytes = baseline(tree, out)
        f, s, stored, extra = setlist_backup(data_root, out)
        base_s.append(b)
        first_s.append(f)
        second_s.append(s)
        print(
            f"round: baseline {b:.2f} s, first {f:.2f} s, second {s:.3f} s, "
            f"stored {stored / 1e6:.0f} MB vs baseline {base_bytes / 1e6:.0f} MB",
            file=sys.stderr,
        )
    first, second, base = min(first_s), min(second_s), min(base_s)
    resumed = resumed_backup(data_root, out, int(args.batch_mb * 2**20))
    print(
        json.dumps(
            {
                "bytes": logical,
                "files": files,
                "first_s": round(first, 3),
                "second_s": round(second, 3),
                "baseline_s": round(base, 3),
                "ratio": round(first / base, 3),
                "incremental_speedup": round(first / second, 1),
                "dedup_ratio": round(logical / stored, 3),
                "baseline_bytes": base_bytes,
                "stored_bytes": stored,
                "second_new_bytes": extra["second_new_bytes"],
                **resumed,
            }
        )
    )


if __name__ == "__main__":
    main()
