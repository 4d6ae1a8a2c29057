#!/usr/bin/env python3
"""Train a tiny image classifier on a commitfs-mounted dataset; write its weights.

Meant to run under ``commitfs run`` (see run.sh beside this file):

    commitfs run --input data=DATA_REPO@main --output out --to MODELS_REPO@main \\
        -- python train.py

which mounts the dataset commit read-only at $COMMITFS_INPUT_DATA and, when
this script succeeds, commits ``out/`` with lineage naming that exact commit.
The dataset is the one scripts/make_sample.py writes: PNG images under
train/ and val/ and a labels.csv (``path,label``).  PNGs are decoded here with
zlib and struct only, so the example needs nothing but torch.

The DataLoader reads the images through the FUSE mount from several worker
processes.  What the run read is logged with commitfs.lineage: params() for
the inputs (ready for mlflow.log_params / wandb.config.update), describe()
for the exact dataset tree.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import struct
import time
import warnings
import zlib

# The CPU build of torch warns when numpy is absent; the example does not use numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import commitfs.lineage  # noqa: E402

SIDE = 16  # images are sampled down to SIDE x SIDE RGB


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw 8-bit pixels) of a non-interlaced 8-bit PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat = 8, []
    width = height = channels = 0
    while pos < len(data):
        length, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color, 0)
            if depth != 8 or not channels or interlace:
                raise ValueError("only 8-bit non-interlaced grey/RGB(A) PNGs are supported")
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride if kind else 0):  # filter 0 (none) leaves the line as is
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return width, height, channels, bytes(out)


class PngFolder(Dataset):
    def __init__(self, root: str, split: str):
        with open(os.path.join(root, "labels.csv"), newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["path"].startswith(split + "/")]
        self.classes = sorted({r["label"] for r in rows}) or ["?"]
        self.items = [(os.path.join(root, r["path"]), self.classes.index(r["label"])) for r in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with open(path, "rb") as f:  # through the read-only mount
            w, h, ch, pixels = decode_png(f.read())
        sample = bytearray()
        for y in range(SIDE):
            for x in range(SIDE):
                at = ((y * h // SIDE) * w + x * w // SIDE) * ch
                px = pixels[at:at + ch]
                sample += px[:3] if ch >= 3 else px[:1] * 3
        image = torch.frombuffer(sample, dtype=torch.uint8).float().div(255).view(SIDE, SIDE, 3).permute(2, 0, 1)
        return image, label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("COMMITFS_INPUT_DATA"), help="dataset root (default: the input 'data')")
    ap.add_argument("--out", default=commitfs.lineage.output_dir(), help="where to write weights (default: --output of commitfs run)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if not args.data or not args.out:
        ap.error("give --data and --out, or run under `commitfs run --input data=... --output DIR`")

    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, val = PngFolder(args.data, "train"), PngFolder(args.data, "val")
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 32), nn.ReLU(), nn.Linear(32, len(train.classes)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for epoch in range(args.epochs):
        total, n = 0.0, 0
        for images, labels in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(labels), n + len(labels)
        losses.append(total / max(n, 1))
        print(f"epoch {epoch + 1}: loss {losses[-1]:.4f} on {n} images")
    with torch.no_grad():
        correct = sum(int(model(img.unsqueeze(0)).argmax()) == label for img, label in val)

    os.makedirs(args.out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
    try:  # exactly which dataset tree this run read (needs a commitfs mount)
        source = commitfs.lineage.describe(args.data).to_dict()
    except commitfs.CommitfsError:
        source = None
    record = {
        "classes": train.classes, "epochs": args.epochs, "train_images": len(train), "loss": losses,
        "val_accuracy": correct / max(len(val), 1), "params": commitfs.lineage.params(), "source": source,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}/model.pt; val accuracy {record['val_accuracy']:.2f}")


if __name__ == "__main__":
    main()
