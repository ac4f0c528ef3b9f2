"""Where the data time of examples/train_jpeg.py goes, per batch of 32 images: PIL decode +
resize per item (train_dataset()) against torchvision's batched decode_jpeg and the example's
device_transform (decode=device), at 1 and at torch's default intra-op threads.

    python experiments/jpeg_decode_parts.py [--device cpu|cuda] [--repeats 7]

Needs torchvision. Prints one line per part (best of `--repeats`, ms) and writes
experiments/results/jpeg_decode_parts-<device>.csv. Figures depend on the machine's load.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def best_ms(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from torchvision.io import ImageReadMode, decode_jpeg

    spec = importlib.util.spec_from_file_location("train_jpeg", ROOT / "examples" / "train_jpeg.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    device = torch.device(args.device)
    decoded_ds, encoded_ds = example.train_dataset(), example.raw_dataset()
    encoded = [torch.frombuffer(bytearray(encoded_ds[i][0]), dtype=torch.uint8) for i in range(32)]
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    parts = {"PIL decode + resize (train_dataset items)": lambda: [decoded_ds[i] for i in range(32)],
             "decode_jpeg, batched": lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device),
             "device_transform": lambda: example.device_transform(images)}
    rows = []
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for name, fn in parts.items():
            ms = best_ms(fn, args.repeats, device)
            rows.append({"device": str(device), "threads": threads, "part": name, "ms_per_32": round(ms, 2)})
            print(f"{device} threads={threads} {name}: {ms:.1f} ms / 32 images", flush=True)
    out = Path(__file__).resolve().parent / "results" / f"jpeg_decode_parts-{device.type}.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
