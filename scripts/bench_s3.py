#!/usr/bin/env python3
"""Sync against S3, beside a plain boto3 baseline on the same server and data.

    scripts/bench_s3.py [--size-mb 200] [--workdir DIR] [--jobs 8] [--endpoint-url URL] [--json]

Figures (each next to its baseline, measured in the same run):

* push of a fresh ~SIZE MB dataset from a local repository to S3, against
  uploading the same files with boto3 from a thread pool (``--jobs``
  threads, one shared client): the time ratio, and bytes on the wire;
* clone of that repository back from S3, against downloading the same
  objects with boto3 in parallel;
* a push after changing 1% of the bytes: bytes sent against bytes changed.

Without ``--endpoint-url`` a moto server (tests/s3server.py, single-threaded
so that conditional writes are atomic) is started on a free port and
stopped at the end; its speed bounds both sides alike.  ``push_vs_boto3`` is
the whole benchmark as one function, meant to move into scripts/bench.py's
``s3`` section.  This is not a test: it prints figures and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def moto_server():
    """A moto S3 server (tests/s3server.py) with fake credentials; yields its endpoint URL."""
    spec = importlib.util.spec_from_file_location("s3server", ROOT / "tests" / "s3server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = module.MotoServer()
    server.start()
    try:
        yield server.endpoint_url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_dataset(root: Path, size_mb: int, seed: int = 7) -> list[Path]:
    """Image-like files of 20-250 KB (half the bytes) and one weights file
    (the other half), all incompressible; reused when already there."""
    marker = root / ".complete"
    if marker.exists():
        return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".complete")
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    budget = size_mb * MiB // 2
    n = 0
    while budget > 0:
        size = min(budget, rng.randint(20_000, 250_000))
        path = root / f"class{n % 10}" / f"img_{n:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        budget -= size
        n += 1
    with open(root / "weights.bin", "wb") as f:
        left = size_mb * MiB // 2
        while left:
            step = min(left, 8 * MiB)
            f.write(rng.randbytes(step))
            left -= step
    old = time.time() - 86400  # outside the stat cache's racy window
    for p in root.rglob("*"):
        os.utime(p, (old, old))
    marker.touch()
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".complete")


def _client(endpoint_url: str | None, jobs: int):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, config=Config(max_pool_connections=max(10, jobs)))


def boto3_upload(files: list[Path], root: Path, bucket: str, prefix: str, endpoint_url: str | None,
                 jobs: int) -> tuple[float, int]:
    """Upload ``files`` with ``jobs`` threads; (seconds, bytes)."""
    client = _client(endpoint_url, jobs)

    def put(path: Path) -> int:
        data = path.read_bytes()
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root)}", Body=data)
        return len(data)

    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        total = sum(pool.map(put, files))
    return time.perf_counter() - start, total


def boto3_download(bucket: str, prefix: str, endpoint_url: str | None, jobs: int) -> tuple[float, int]:
    client = _client(endpoint_url, jobs)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", ())]
    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        total = sum(pool.map(lambda k: len(client.get_object(Bucket=bucket, Key=k)["Body"].read()), keys))
    return time.perf_counter() - start, total


def push_vs_boto3(workdir: Path, size_mb: int = 200, jobs: int = 8, endpoint_url: str | None = None,
                  log=print) -> dict:
    """The whole benchmark; returns its figures (seconds, bytes, ratios)."""
    from commitfs.ops import sync
    from commitfs.ops.snapshot import commit_directory
    from commitfs.repo.repository import Repository

    if endpoint_url is None:
        with moto_server() as url:
            return push_vs_boto3(workdir, size_mb, jobs, url, log)

    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(workdir / "xdg-cache")
    data = workdir / f"data-{size_mb}mb"
    files = make_dataset(data, size_mb)
    dataset_bytes = sum(p.stat().st_size for p in files)
    log(f"dataset: {len(files)} files, {dataset_bytes / MiB:.1f} MiB")

    run = uuid.uuid4().hex[:8]
    client = _client(endpoint_url, jobs)
    bucket = f"bench-{run}"
    client.create_bucket(Bucket=bucket)
    out: dict = {"dataset_bytes": dataset_bytes, "files": len(files), "jobs": jobs}

    t, nbytes = boto3_upload(files, data, bucket, "baseline", endpoint_url, jobs)
    out["boto3_upload_s"] = t
    log(f"boto3 upload, {jobs} threads: {t:.2f} s ({nbytes / MiB / t:.1f} MiB/s)")

    local_url = str(workdir / f"local-{run}")
    with Repository.init(local_url) as repo:
        start = time.perf_counter()
        commit_directory(repo, data, message="v1")
        out["local_commit_s"] = time.perf_counter() - start
    log(f"(local commit: {out['local_commit_s']:.2f} s, not part of the push)")

    # The server's speed for large objects: the repository's own packs, uploaded with boto3.
    packs = sorted(Path(local_url, "packs").rglob("*"))
    packs = [p for p in packs if p.is_file()]
    t, nbytes = boto3_upload(packs, Path(local_url), bucket, "packs-baseline", endpoint_url, jobs)
    out["boto3_upload_packs_s"] = t
    log(f"boto3 upload of the {len(packs)} pack files ({nbytes / MiB:.1f} MiB): {t:.2f} s "
        f"({nbytes / MiB / t:.1f} MiB/s)")

    s3_url = f"s3://{bucket}/repo"
    opts = {"endpoint_url": endpoint_url}
    Repository.init(s3_url, **opts).close()
    with Repository.open(local_url) as lr, Repository.open(s3_url, **opts) as rr:
        start = time.perf_counter()
        result = sync.push(lr, rr, threads=jobs)
        t = time.perf_counter() - start
    out.update(push_s=t, push_bytes_sent=result.stats.bytes_sent, push_packs=result.stats.packs,
               push_vs_boto3=t / out["boto3_upload_s"], push_vs_boto3_packs=t / out["boto3_upload_packs_s"])
    log(f"commitfs push: {t:.2f} s ({result.stats.bytes_sent / MiB / t:.1f} MiB/s, {result.stats.packs} packs,"
        f" {result.stats.objects} objects): {out['push_vs_boto3']:.2f}x the boto3 upload of the files, "
        f"{out['push_vs_boto3_packs']:.2f}x that of the packs")

    t, nbytes = boto3_download(bucket, "baseline/", endpoint_url, jobs)
    out["boto3_download_s"] = t
    log(f"boto3 download, {jobs} threads: {t:.2f} s ({nbytes / MiB / t:.1f} MiB/s)")
    clone_url = str(workdir / f"clone-{run}")
    with Repository.open(s3_url, **opts) as rr, Repository.init(clone_url) as cr:
        start = time.perf_counter()
        result = sync.clone(cr, rr, threads=jobs)
        t = time.perf_counter() - start
    out.update(clone_s=t, clone_vs_boto3=t / out["boto3_download_s"])
    log(f"commitfs clone: {t:.2f} s ({result.stats.bytes_read / MiB / t:.1f} MiB/s): "
        f"{out['clone_vs_boto3']:.2f}x the boto3 download")

    # 1% of the bytes changed: in place in the weights file and in some images.
    changed_dir = workdir / f"changed-{run}"
    shutil.copytree(data, changed_dir)
    rng = random.Random(1)
    budget = changed = dataset_bytes // 100
    with open(changed_dir / "weights.bin", "r+b") as f:
        f.seek(f.seek(0, os.SEEK_END) // 3)
        f.write(rng.randbytes(budget // 2))
    budget -= budget // 2
    for p in sorted(changed_dir.rglob("img_*.jpg"))[::37]:
        if budget <= 0:
            break
        size = p.stat().st_size
        p.write_bytes(rng.randbytes(size))
        budget -= size
    changed -= budget  # bytes actually rewritten
    with Repository.open(local_url) as repo:
        commit_directory(repo, changed_dir, message="v2")
    with Repository.open(local_url) as lr, Repository.open(s3_url, **opts) as rr:
        start = time.perf_counter()
        result = sync.push(lr, rr, threads=jobs)
        t = time.perf_counter() - start
    out.update(change_bytes=changed, change_push_bytes_sent=result.stats.bytes_sent, change_push_s=t,
               change_ratio=result.stats.bytes_sent / changed)
    log(f"push after changing {changed / MiB:.2f} MiB (1%): sent {result.stats.bytes_sent / MiB:.2f} MiB "
        f"({out['change_ratio']:.2f}x the change) in {t:.2f} s")
    shutil.rmtree(changed_dir, ignore_errors=True)
    for d in (local_url, clone_url):
        shutil.rmtree(d, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "commitfs-bench-s3")
    ap.add_argument("--endpoint-url", help="an existing S3 server (default: start moto)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    figures = push_vs_boto3(args.workdir, args.size_mb, args.jobs, args.endpoint_url,
                            log=(lambda *_: None) if args.json else print)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
