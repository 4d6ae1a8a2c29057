#!/usr/bin/env python3
"""Benchmarks of commitfs: each figure beside a baseline measured in the same run.

    scripts/bench.py [--section core|mount|s3|all] [--scale small|full]
                     [--workdir DIR] [--json] [--profile FILE]

Machines are noisy, so no figure stands alone: each is printed next to a
baseline taken in the same run on the same data (reading the files into
/dev/null, the first commit's time, the bytes a user changed) and judged by
the ratio.  A missed target prints MISS: that is information, not a failure,
and the script exits 0 either way.  This is not a test: speed goals live
here, never in tests/.

Data.  A seeded image-like dataset (train|val/<class>/img_NNNNN.jpg of
incompressible bytes, a labels.csv with one row per image, a random weights
file) is generated once per workdir and scale and reused; every run first
restores the files an earlier run changed and sets all mtimes to a day ago,
so the stat cache's racy-file rule (files modified within 2 s of a scan are
re-read) never distorts a figure.  The stat cache itself is kept under the
workdir (XDG_CACHE_HOME), never the user's.

Sections.  A section is a function ``(Bench) -> SectionResult`` registered
with ``@section(name, help)``; ``--section all`` runs every registered one.
``core`` and ``mount`` are implemented; ``s3`` is a placeholder to replace.
A section gets the shared dataset from ``bench.dataset()`` and empty scratch
directories from ``bench.scratch(name)``, and uses the helpers below
(``timed``, ``read_to_devnull``, ``drop_caches``, ``commit_in_process``,
``commit_cli``, ``stored_bytes``).  docs/BENCH.md says more.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import blake3

from commitfs.cli.output import human_size
from commitfs.ops.snapshot import CommitResult, commit_directory
from commitfs.repo.repository import Repository

KiB = 1024
MiB = 1024 * KiB
DAY = 86400

# Bump when the generated data changes, so old workdirs are regenerated.
GENERATOR_VERSION = 1


# --- scales ---------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    name: str
    images: int
    weights: int  # bytes of the weights file
    classes: int
    seed: int = 20240601


SCALES = {
    # A quick check: about a minute including generation on a 2-core VM.
    "small": Scale("small", images=2_000, weights=64 * MiB, classes=10),
    # The size: ~10k images of 20-250 KB and a 256 MiB weights file.
    "full": Scale("full", images=10_000, weights=256 * MiB, classes=10),
}


# --- the dataset ----------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    path: str
    size: int
    label: str
    split: str
    width: int
    height: int


# Looks like a JPEG to tools that sniff magic bytes; the rest is random.
_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_JPEG_TAIL = b"\xff\xd9"


class Dataset:
    """The seeded dataset of one scale under ``root``, and the edits the benchmarks make.

    Every byte is a function of the seed: file contents are BLAKE3 XOF
    streams keyed by (seed, path, version), so any file or region can be
    rewritten to any version without keeping a copy.
    """

    LABELS = "labels.csv"
    WEIGHTS = "model/weights.bin"
    EDIT_SIZE = 4 * MiB
    APPENDED_ROWS = 100

    def __init__(self, root: Path, scale: Scale):
        self.root = root
        self.scale = scale
        rng = random.Random(scale.seed)
        self.images: list[Image] = []
        for i in range(scale.images):
            label = f"class_{rng.randrange(scale.classes):02d}"
            split = "val" if i % 10 == 0 else "train"
            self.images.append(Image(f"{split}/{label}/img_{i:05d}.jpg", rng.randint(20_000, 250_000), label,
                                     split, rng.randint(224, 1024), rng.randint(224, 1024)))
        n = max(1, scale.images // 100)
        picked = random.Random(scale.seed + 1).sample(range(scale.images), 2 * n)
        # Disjoint sets of 1% of the images, one per incremental-commit figure.
        self.change_sets = [sorted(picked[:n]), sorted(picked[n:])]
        # An in-place edit in the middle of the weights, not aligned to anything.
        self.edit_offset = scale.weights // 2 + 12_345

    # --- contents ---------------------------------------------------------------
    def _stream(self, name: str, version: int) -> blake3.blake3:
        return blake3.blake3(f"commitfs-bench/{self.scale.seed}/{name}/v{version}".encode())

    def image_bytes(self, img: Image, version: int = 0) -> bytes:
        body = self._stream(img.path, version).digest(length=img.size - len(_JPEG_HEAD) - len(_JPEG_TAIL))
        return _JPEG_HEAD + body + _JPEG_TAIL

    def weights_bytes(self, offset: int, length: int, version: int = 0) -> bytes:
        return self._stream(self.WEIGHTS, version).digest(length=length, seek=offset)

    def labels_bytes(self) -> bytes:
        rows = ["path,label,split,width,height\n"]
        rows += [f"{i.path},{i.label},{i.split},{i.width},{i.height}\n" for i in self.images]
        return "".join(rows).encode()

    def appended_rows(self) -> bytes:
        rng = random.Random(self.scale.seed + 2)
        rows = []
        for k in range(self.APPENDED_ROWS):
            label = f"class_{rng.randrange(self.scale.classes):02d}"
            rows.append(f"train/{label}/img_{self.scale.images + k:05d}.jpg,{label},train,"
                        f"{rng.randint(224, 1024)},{rng.randint(224, 1024)}\n")
        return "".join(rows).encode()

    def expected_sizes(self) -> dict[str, int]:
        sizes = {i.path: i.size for i in self.images}
        sizes[self.LABELS] = len(self.labels_bytes())
        sizes[self.WEIGHTS] = self.scale.weights
        return sizes

    @property
    def total_bytes(self) -> int:
        return sum(self.expected_sizes().values())

    def paths(self) -> list[str]:
        return sorted(self.expected_sizes())

    # --- on disk ----------------------------------------------------------------
    @property
    def _marker(self) -> Path:
        return self.root.with_name(self.root.name + ".json")

    def _marker_data(self) -> dict:
        return {"generator": GENERATOR_VERSION, "scale": asdict(self.scale)}

    def _layout_ok(self) -> bool:
        """Same files and sizes as generated (labels.csv aside: it is rewritten anyway)."""
        try:
            if json.loads(self._marker.read_text()) != self._marker_data():
                return False
        except (OSError, ValueError):
            return False
        expected = self.expected_sizes()
        found = {}
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                full = os.path.join(dirpath, name)
                found[os.path.relpath(full, self.root)] = os.lstat(full).st_size
        if found.keys() != expected.keys():
            return False
        return all(found[p] == s for p, s in expected.items() if p != self.LABELS)

    def _write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def _rewrite_in_place(self, rel: str, offset: int, data: bytes, mtime: float) -> None:
        """Overwrite bytes without replacing the file (same inode, as an editor saving in place)."""
        with open(self.root / rel, "r+b") as f:
            f.seek(offset)
            f.write(data)
        os.utime(self.root / rel, (mtime, mtime))

    def _generate(self, log: Callable[[str], None]) -> None:
        log(f"generating the {self.scale.name} dataset in {self.root} ({human(self.total_bytes, 'B')})")
        self._marker.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)
        for n, img in enumerate(self.images):
            self._write(img.path, self.image_bytes(img))
            if n % 2000 == 1999:
                log(f"  {n + 1} images")
        (self.root / self.WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
        with open(self.root / self.WEIGHTS, "wb") as f:
            step = 16 * MiB
            for off in range(0, self.scale.weights, step):
                f.write(self.weights_bytes(off, min(step, self.scale.weights - off)))
        self._write(self.LABELS, self.labels_bytes())
        os.sync()
        self._marker.write_text(json.dumps(self._marker_data()) + "\n")

    def ensure(self, log: Callable[[str], None]) -> None:
        """Generate, or reuse after undoing any edit an earlier run made; then age every mtime."""
        if self._layout_ok():
            log(f"reusing the {self.scale.name} dataset in {self.root}")
            for k in (i for s in self.change_sets for i in s):
                self._write(self.images[k].path, self.image_bytes(self.images[k]))
            self._write(self.LABELS, self.labels_bytes())
            with open(self.root / self.WEIGHTS, "r+b") as f:
                f.seek(self.edit_offset)
                f.write(self.weights_bytes(self.edit_offset, self.EDIT_SIZE))
        else:
            self._generate(log)
        old = time.time() - DAY
        for rel in self.paths():
            os.utime(self.root / rel, (old, old))

    # --- the edits the benchmarks make ------------------------------------------
    def change_images(self, which: int, mtime: float) -> tuple[int, int]:
        """Rewrite change set ``which`` in place with new content of equal size; (files, bytes)."""
        files = [self.images[k] for k in self.change_sets[which]]
        for img in files:
            self._rewrite_in_place(img.path, 0, self.image_bytes(img, version=1 + which), mtime)
        return len(files), sum(i.size for i in files)

    def edit_weights(self, mtime: float) -> int:
        data = self.weights_bytes(self.edit_offset, self.EDIT_SIZE, version=1)
        self._rewrite_in_place(self.WEIGHTS, self.edit_offset, data, mtime)
        return len(data)

    def append_labels(self, mtime: float) -> int:
        rows = self.appended_rows()
        with open(self.root / self.LABELS, "ab") as f:
            f.write(rows)
        os.utime(self.root / self.LABELS, (mtime, mtime))
        return len(rows)


# --- measuring helpers ------------------------------------------------------------
def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def read_to_devnull(root: Path, paths: list[str]) -> int:
    """Read every file sequentially into /dev/null (what `cat files > /dev/null` does); bytes read."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    total = 0
    out = os.open(os.devnull, os.O_WRONLY)
    try:
        for rel in paths:
            with open(root / rel, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    os.write(out, view[:n])
                    total += n
    finally:
        os.close(out)
    return total


def drop_caches() -> str | None:
    """Empty the page cache (sync; echo 3 > drop_caches); None if done, else why not."""
    if os.geteuid() != 0:
        return "not running as root"
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"cannot write /proc/sys/vm/drop_caches: {exc.strerror or exc}"
    return None


def stored_bytes(repo_dir: Path) -> dict[str, int]:
    """Bytes of every file under a local repository, by top-level entry (packs, index, commits...)."""
    out: dict[str, int] = {}
    for dirpath, _, files in os.walk(repo_dir):
        for name in files:
            full = os.path.join(dirpath, name)
            top = os.path.relpath(full, repo_dir).split(os.sep)[0]
            out[top] = out.get(top, 0) + os.lstat(full).st_size
    return out


def object_counts(repo_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for dirpath, _, files in os.walk(repo_dir):
        for name in files:
            top = os.path.relpath(os.path.join(dirpath, name), repo_dir).split(os.sep)[0]
            out[top] = out.get(top, 0) + 1
    return out


def commit_in_process(repo_url: str, data_dir: Path, message: str) -> tuple[float, CommitResult]:
    """Time Repository.open + commit_directory + close, as a Python API user sees it."""
    def run() -> CommitResult:
        with Repository.open(repo_url) as repo:
            return commit_directory(repo, data_dir, message=message, author="bench")
    return timed(run)  # type: ignore[return-value]


def commitfs_command() -> list[str]:
    exe = Path(sys.executable).with_name("commitfs")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "commitfs.cli"]


def commit_cli(repo_url: str, data_dir: Path, message: str) -> tuple[float, dict]:
    """Time `commitfs commit --json` in a subprocess (interpreter start-up included)."""
    cmd = commitfs_command() + ["commit", "-r", repo_url, str(data_dir), "-m", message, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return seconds, json.loads(proc.stdout)


@contextmanager
def profiled(path: str, log: Callable[[str], None]) -> Iterator[None]:
    """cProfile the block in every thread it starts (cProfile alone sees only the caller's)."""
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_thread_profiler(*_) -> None:
        sys.setprofile(None)
        p = cProfile.Profile()
        with lock:
            profilers.append(p)
        p.enable()

    main = cProfile.Profile()
    threading.setprofile(start_thread_profiler)
    main.enable()
    try:
        yield
    finally:
        main.disable()
        threading.setprofile(None)
        stats = pstats.Stats(main, stream=sys.stderr)
        for p in profilers:
            stats.add(p)
        stats.dump_stats(path)
        log(f"profile of the first commit ({1 + len(profilers)} threads, times summed over threads; "
            f"SimpleQueue.get is idle pool workers) saved to {path}; top functions:")
        stats.sort_stats("tottime").print_stats(25)


# --- results ------------------------------------------------------------------------
def human(value: float, unit: str) -> str:
    if unit == "B":
        return human_size(int(value))
    if unit == "B/s":
        return human_size(int(value)) + "/s"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "count":
        return f"{value:,.0f}"
    return f"{value:g} {unit}"


@dataclass
class Row:
    """One figure beside its baseline; the target, if any, applies to value / baseline."""

    figure: str
    value: float
    baseline: float | None
    unit: str  # of value and baseline: "B/s", "s", "B", "count"
    target: tuple[str, float] | None = None  # (">=" | "<=", ratio)

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None

    @property
    def status(self) -> str:
        if self.target is None or self.ratio is None:
            return "info"
        op, bound = self.target
        return "PASS" if (self.ratio >= bound if op == ">=" else self.ratio <= bound) else "MISS"

    def cells(self) -> list[str]:
        ratio = "" if self.ratio is None else f"{self.ratio:.3f}x" if self.ratio < 0.1 else f"{self.ratio:.2f}x"
        return [self.figure, human(self.value, self.unit),
                "" if self.baseline is None else human(self.baseline, self.unit), ratio,
                "" if self.target is None else f"{self.target[0]} {self.target[1]:g}x", self.status]

    def to_json(self) -> dict:
        return {"figure": self.figure, "value": self.value, "baseline": self.baseline, "unit": self.unit,
                "ratio": self.ratio, "target": list(self.target) if self.target else None, "status": self.status}


@dataclass
class SectionResult:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # raw numbers, for --json
    implemented: bool = True


def format_table(rows: list[Row]) -> str:
    header = ["figure", "value", "baseline", "ratio", "target", "result"]
    cells = [header] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

    def line(c: list[str]) -> str:
        return "  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i])
                         for i in range(len(c))).rstrip()
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells[1:]])


# --- the bench and its sections ---------------------------------------------------------
class Bench:
    """What a section gets: scale, workdir, the shared dataset, scratch space, logging."""

    def __init__(self, scale: Scale, workdir: Path, profile: str | None = None):
        self.scale = scale
        self.workdir = workdir
        self.profile = profile
        self._dataset: Dataset | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        # Stat caches of this bench's repositories stay in the workdir.
        cache = workdir / "xdg-cache"
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["XDG_CACHE_HOME"] = str(cache)
        self._start = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self._start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def dataset(self) -> Dataset:
        """The seeded dataset, pristine and with old mtimes (generated on first use)."""
        if self._dataset is None:
            self._dataset = Dataset(self.workdir / f"dataset-{self.scale.name}", self.scale)
            self._dataset.ensure(self.log)
        return self._dataset

    def scratch(self, name: str) -> Path:
        """An empty directory of the workdir (emptied if it exists)."""
        path = self.workdir / f"{name}-{self.scale.name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


SectionFn = Callable[[Bench], SectionResult]
SECTIONS: dict[str, tuple[str, SectionFn]] = {}


def section(name: str, help_: str) -> Callable[[SectionFn], SectionFn]:
    """Register a section; ``--section NAME`` runs it, ``--section all`` runs them all."""
    def register(fn: SectionFn) -> SectionFn:
        SECTIONS[name] = (help_, fn)
        return fn
    return register


@section("core", "commit throughput, incremental commits, bytes stored per edit (local repository)")
def bench_core(b: Bench) -> SectionResult:
    ds = b.dataset()
    out = SectionResult()
    notes = out.notes
    paths = ds.paths()
    nfiles, nbytes = len(paths), ds.total_bytes
    repo_dir = b.scratch("repo")
    Repository.init(str(repo_dir)).close()
    now = time.time()

    # 1. First commit against reading the same files into /dev/null, both warm.
    b.log("warming the page cache, then timing the read into /dev/null (median of 3)")
    read_to_devnull(ds.root, paths)
    reads = [timed(read_to_devnull, ds.root, paths) for _ in range(3)]
    assert all(n == nbytes for _, n in reads), "the dataset changed under the read baseline"
    read_s = statistics.median(s for s, _ in reads)
    os.sync()
    b.log("first commit (warm)")
    commit_s, first = commit_in_process(str(repo_dir), ds.root, "first")
    out.rows.append(Row("first commit throughput vs read to /dev/null (warm)",
                        nbytes / commit_s, nbytes / read_s, "B/s", (">=", 0.5)))
    if first.files_read != nfiles or first.bytes_read != nbytes:
        notes.append(f"WARNING: the first commit read {first.files_read} files / {first.bytes_read} B, "
                     f"expected {nfiles} / {nbytes}")
    after_first = stored_bytes(repo_dir)
    counts = object_counts(repo_dir)

    # Context: a plain copy of the same files, which also has to write every byte.
    copy_dir = b.scratch("copy")
    b.log("copying the dataset (cp -a + sync) for context")
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-a", f"{ds.root}/.", str(copy_dir)], check=True)
    os.sync()
    copy_s = time.perf_counter() - t0
    shutil.rmtree(copy_dir)
    out.rows.append(Row("first commit throughput vs cp -a + sync (warm)", nbytes / commit_s, nbytes / copy_s, "B/s"))

    # 2. Incremental commits after changing 1% of the files, against the first commit.
    changed, changed_bytes = ds.change_images(0, mtime=now - 3600)
    os.sync()
    b.log(f"incremental commit after changing {changed} files (in-process)")
    inc_s, inc = commit_in_process(str(repo_dir), ds.root, "1% changed")
    out.rows.append(Row(f"incremental commit, {changed} of {nfiles} files changed, vs first commit",
                        inc_s, commit_s, "s", ("<=", 0.05)))
    if inc.files_read != changed:
        notes.append(f"WARNING: the incremental commit read {inc.files_read} files, expected {changed}")

    changed_cli, _ = ds.change_images(1, mtime=now - 3500)
    os.sync()
    b.log(f"incremental commit after changing {changed_cli} other files (CLI subprocess)")
    cli_s, cli = commit_cli(str(repo_dir), ds.root, "1% changed again")
    out.rows.append(Row("  same, as `commitfs commit` in a subprocess", cli_s, commit_s, "s", ("<=", 0.05)))

    # 3. Bytes stored for small edits, against the bytes changed.
    before = stored_bytes(repo_dir)
    edited = ds.edit_weights(mtime=now - 1800)
    b.log(f"commit after a {human(edited, 'B')} in-place edit of the weights")
    w_s, w = commit_in_process(str(repo_dir), ds.root, "weights edit")
    after_w = stored_bytes(repo_dir)
    out.rows.append(Row(f"bytes stored for a {human(edited, 'B')} in-place weights edit vs bytes changed",
                        sum(after_w.values()) - sum(before.values()), edited, "B", ("<=", 2.0)))
    appended = ds.append_labels(mtime=now - 1200)
    b.log(f"commit after appending {ds.APPENDED_ROWS} rows ({appended} B) to {ds.LABELS}")
    c_s, c = commit_in_process(str(repo_dir), ds.root, "labels appended")
    after_c = stored_bytes(repo_dir)
    out.rows.append(Row(f"bytes stored for {ds.APPENDED_ROWS} appended CSV rows vs bytes appended",
                        sum(after_c.values()) - sum(after_w.values()), appended, "B", ("<=", 2.0)))
    for name, res in (("weights edit", w), ("CSV append", c)):
        if res.files_read != 1:
            notes.append(f"WARNING: the {name} commit read {res.files_read} files, expected 1")

    # 4. Shape of the first commit.
    nobjects = sum(counts.values())
    out.rows.append(Row("repository objects (files) per 10k files, after the first commit",
                        nobjects * 10_000 / nfiles, None, "count"))
    out.rows.append(Row("first commit: bytes stored vs dataset size (dedup-aware)",
                        sum(after_first.values()), nbytes, "B"))

    # 5. Cold page cache, when we may drop it: last, so the warm figures above stay warm.
    cold_s = cold_read_s = None
    why_not = drop_caches()
    if why_not is None:
        b.log("reading into /dev/null with a cold page cache")
        drop_caches()
        cold_read_s, cold_bytes = timed(read_to_devnull, ds.root, paths)
        cold_repo = b.scratch("repo-cold")
        Repository.init(str(cold_repo)).close()
        b.log("first commit into a new repository with a cold page cache")
        drop_caches()
        cold_s, cold = commit_in_process(str(cold_repo), ds.root, "cold")
        shutil.rmtree(cold_repo)
        out.rows.append(Row("first commit throughput vs read to /dev/null (cold)",
                            cold_bytes / cold_s, cold_bytes / cold_read_s, "B/s", (">=", 0.5)))
    else:
        notes.append(f"cold-cache figures skipped: {why_not}")

    if b.profile:
        prof_repo = b.scratch("repo-profile")
        Repository.init(str(prof_repo)).close()
        b.log("profiling a first commit (extra run, not in the table)")
        with profiled(b.profile, b.log):
            commit_in_process(str(prof_repo), ds.root, "profiled")
        shutil.rmtree(prof_repo)
    shutil.rmtree(repo_dir)

    w_stats = first.write
    notes += [
        f"dataset: {ds.scale.images:,} images + {ds.LABELS} + {ds.WEIGHTS} = {nfiles:,} files, "
        f"{human(nbytes, 'B')} (weights {human(ds.scale.weights, 'B')}), seed {ds.scale.seed}, in {ds.root}",
        "commits are timed in-process (Repository.open + commit_directory + close) unless marked CLI; "
        "the read baseline is one thread reading 1 MiB blocks into /dev/null",
        f"times: read {human(read_s, 's')}, first commit {human(commit_s, 's')}, cp -a + sync {human(copy_s, 's')}, "
        f"incremental {human(inc_s, 's')} (read {inc.files_read} files, {human(inc.bytes_read, 'B')}), "
        f"CLI incremental {human(cli_s, 's')} (read {cli.get('files_read')} files), "
        f"weights-edit commit {human(w_s, 's')}, CSV-append commit {human(c_s, 's')}"
        + (f", cold read {human(cold_read_s, 's')}, cold first commit {human(cold_s, 's')}" if cold_s else ""),
        f"first commit wrote {w_stats.blobs_new:,} blobs ({human(w_stats.bytes_new_stored, 'B')} stored) "
        f"in {w_stats.packs} packs; repository objects: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "growth by part: weights edit " + _growth(before, after_w) + "; CSV append " + _growth(after_w, after_c),
    ]
    out.details = {
        "files": nfiles, "bytes": nbytes, "read_s": read_s, "first_commit_s": commit_s, "copy_s": copy_s,
        "incremental_s": inc_s, "incremental_cli_s": cli_s, "weights_commit_s": w_s, "csv_commit_s": c_s,
        "cold_read_s": cold_read_s, "cold_first_commit_s": cold_s,
        "first_commit_write": asdict(w_stats), "objects_after_first": counts,
        "stored_after_first": after_first, "stored_before_weights": before,
        "stored_after_weights": after_w, "stored_after_csv": after_c,
    }
    return out


def _growth(before: dict[str, int], after: dict[str, int]) -> str:
    parts = [f"{k} +{human(after.get(k, 0) - before.get(k, 0), 'B')}"
             for k in sorted(after.keys() | before.keys()) if after.get(k, 0) != before.get(k, 0)]
    return ", ".join(parts) or "nothing"


@section("mount", "reads through a FUSE mount of a local repository vs the same reads of the files")
def bench_mount(b: Bench) -> SectionResult:
    ds = b.dataset()
    out = SectionResult()
    paths = ds.paths()
    nbytes = ds.total_bytes
    repo_dir = b.scratch("repo-mount")
    Repository.init(str(repo_dir)).close()
    b.log("committing the dataset")
    commit_in_process(str(repo_dir), ds.root, "mount bench")
    mnt = b.scratch("mnt")
    cache_dir = b.scratch("mount-cache")

    def mount() -> float:
        """Mount main; return the seconds until a first `ls` of the root answered."""
        t0 = time.perf_counter()
        proc = subprocess.run(commitfs_command() + ["mount", "-r", str(repo_dir), "--cache-dir", str(cache_dir),
                                                    "main", str(mnt)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"commitfs mount failed: {proc.stderr.strip()}")
        os.listdir(mnt)
        return time.perf_counter() - t0

    def umount() -> None:
        proc = subprocess.run(commitfs_command() + ["umount", str(mnt)], capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)

    def parallel_read(root: Path, nproc: int = 4) -> int:
        from concurrent.futures import ProcessPoolExecutor

        shares = [paths[i::nproc] for i in range(nproc)]
        with ProcessPoolExecutor(nproc) as pool:
            return sum(pool.map(read_to_devnull, [root] * nproc, shares))

    def random_reads(path: Path, count: int = 2000, size: int = 4 * KiB) -> int:
        rng = random.Random(7)
        length = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            return sum(len(os.pread(fd, size, rng.randrange(length - size))) for _ in range(count))
        finally:
            os.close(fd)

    b.log("warming the page cache, then timing the read into /dev/null (median of 3)")
    read_to_devnull(ds.root, paths)
    disk_s = statistics.median(timed(read_to_devnull, ds.root, paths)[0] for _ in range(3))
    weights = ds.root / ds.WEIGHTS
    disk_w_s = statistics.median(timed(read_to_devnull, ds.root, [ds.WEIGHTS])[0] for _ in range(3))
    disk_par_s, _ = timed(parallel_read, ds.root)
    disk_rand_s, _ = timed(random_reads, weights)
    try:
        b.log("mount, first ls, first read of every file through the mount")
        first_ls_s = mount()
        cold_s, n = timed(read_to_devnull, mnt, paths)
        assert n == nbytes, "the mount returned a different number of bytes"
        b.log("warm re-reads through the same mount (median of 3)")
        warm_s = statistics.median(timed(read_to_devnull, mnt, paths)[0] for _ in range(3))
        warm_w_s = statistics.median(timed(read_to_devnull, mnt, [ds.WEIGHTS])[0] for _ in range(3))
        umount()
        b.log("remount: first read of the weights alone")
        mount()
        cold_w_s, _ = timed(read_to_devnull, mnt, [ds.WEIGHTS])
        umount()
        b.log("remount: 4 processes reading a quarter of the files each")
        mount()
        cold_par_s, _ = timed(parallel_read, mnt)
        umount()
        b.log("remount: 2000 random 4 KiB reads of the weights")
        mount()
        cold_rand_s, _ = timed(random_reads, mnt / ds.WEIGHTS)
    finally:
        umount()
    shutil.rmtree(repo_dir)
    wbytes = weights.stat().st_size
    out.rows += [
        Row("warm re-read of every file through the mount vs the files (warm)",
            nbytes / warm_s, nbytes / disk_s, "B/s", (">=", 0.8)),
        Row(f"  same, the {human(wbytes, 'B')} weights file alone", wbytes / warm_w_s, wbytes / disk_w_s, "B/s",
            (">=", 0.8)),
        Row("first read of every file through a new mount vs the files (warm)",
            nbytes / cold_s, nbytes / disk_s, "B/s"),
        Row("  same, the weights file alone", wbytes / cold_w_s, wbytes / disk_w_s, "B/s"),
        Row("first read by 4 processes through a new mount vs 4 processes reading the files",
            nbytes / cold_par_s, nbytes / disk_par_s, "B/s"),
        Row("2000 random 4 KiB reads of the weights, new mount vs the file", cold_rand_s, disk_rand_s, "s"),
        Row("commitfs mount + first ls of the root", first_ls_s, None, "s"),
    ]
    out.notes += [
        "a local repository is read in place (no chunk cache); its packs are in the page cache, so 'first read' "
        "measures the mount's own cost (FUSE round trips, chunk lookup, BLAKE3 verification), not storage",
        "warm re-reads are served by the kernel's page cache (files are opened with keep_cache, attributes "
        "trusted for a day): the figure a training job's second epoch sees",
    ]
    out.details = {"disk_s": disk_s, "warm_s": warm_s, "cold_s": cold_s, "disk_weights_s": disk_w_s,
                   "warm_weights_s": warm_w_s, "cold_weights_s": cold_w_s, "disk_parallel_s": disk_par_s,
                   "cold_parallel_s": cold_par_s, "disk_random_s": disk_rand_s, "cold_random_s": cold_rand_s,
                   "first_ls_s": first_ls_s}
    return out


@section("s3", "commit and read against an S3 endpoint (placeholder)")
def bench_s3(b: Bench) -> SectionResult:
    # To implement: the core figures against s3://... (a local moto or MinIO
    # endpoint), each beside the same operation on a local repository.
    return SectionResult(notes=["not implemented yet"], implemented=False)


# --- main -----------------------------------------------------------------------------
def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=[*SECTIONS, "all"], default="all",
                        help="which section to run (default: all)")
    parser.add_argument("--scale", choices=list(SCALES), default="small",
                        help="small: a quick check (~1 min); full: the issue's size (default: small)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/commitfs-bench"),
                        help="where the dataset (kept) and scratch repositories go (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--profile", metavar="FILE",
                        help="also cProfile an extra first commit (all threads) into FILE (pstats format)")
    args = parser.parse_args(argv)

    bench = Bench(SCALES[args.scale], args.workdir.absolute(), args.profile)
    names = list(SECTIONS) if args.section == "all" else [args.section]
    results: dict[str, SectionResult] = {}
    for name in names:
        bench.log(f"section {name}")
        results[name] = SECTIONS[name][1](bench)

    info = {"commitfs": git_revision(), "scale": args.scale, "python": platform.python_version(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release(),
            "euid": os.geteuid(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps({"info": info, "sections": {
            n: {"implemented": r.implemented, "rows": [row.to_json() for row in r.rows], "notes": r.notes,
                "details": r.details} for n, r in results.items()}}, indent=1, default=str))
        return 0
    print(f"commitfs bench ({info['commitfs']}), scale {args.scale}, python {info['python']}, "
          f"{info['cpus']} CPUs, kernel {info['kernel']}, load average at the end "
          + "/".join(str(x) for x in info["loadavg_at_end"]))
    for name, r in results.items():
        print(f"\n== {name}: {SECTIONS[name][0]}")
        if r.rows:
            print(format_table(r.rows))
        for note in r.notes:
            print(f"  - {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
