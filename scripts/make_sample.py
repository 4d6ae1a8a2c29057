#!/usr/bin/env python3
"""Make a small, seeded sample image dataset: PNG images in class folders and labels.csv.

    python scripts/make_sample.py DIR [--images N] [--seed S]

The images are real PNG files (written with zlib, no imaging library needed),
so an image viewer opens them from a mount.
"""

from __future__ import annotations

import argparse
import random
import struct
import zlib
from pathlib import Path

CLASSES = ["cat", "dog", "bird", "fish"]


def png(width: int, height: int, rng: random.Random) -> bytes:
    """A noisy RGB gradient as PNG bytes."""
    r0, g0, b0 = rng.randrange(256), rng.randrange(256), rng.randrange(256)
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        noise = rng.randbytes(width * 3)
        for x in range(width):
            rows += bytes(((r0 + x + noise[3 * x]) & 255, (g0 + y + noise[3 * x + 1]) & 255,
                           (b0 + x + y + noise[3 * x + 2]) & 255))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + chunk(b"IEND", b"")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows = ["path,label"]
    for i in range(args.images):
        split = "train" if i % 5 else "val"
        label = CLASSES[i % len(CLASSES)]
        rel = f"{split}/{label}/img_{i:05d}.png"
        path = args.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(rng.choice([64, 96, 128]), rng.choice([64, 96, 128]), rng))
        rows.append(f"{rel},{label}")
    (args.dir / "labels.csv").write_text("\n".join(rows) + "\n")
    (args.dir / "README.txt").write_text("A sample image dataset made by commitfs' scripts/make_sample.py\n")
    print(f"wrote {args.images} images and labels.csv under {args.dir}")


if __name__ == "__main__":
    main()
