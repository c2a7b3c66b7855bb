"""Pack a CIFAR-10 image folder (train/<class>/*.jpg, test/...) into one file that travels:

    python -m scripts.pack_cifar10                       # ../shared/data/cifar10 -> data/cifar10.pack
    python -m scripts.pack_cifar10 --root DIR --out FILE.pack

The file holds the folder's bytes, each distinct header once (adaptive_sparse/training/data/packed.py
says the layout), in the order the folder loader reads them, so `dataset.root=FILE.pack` decodes to
the folder's tensors. data/ is ignored by git; a GPU check carries it (scripts/gpu_check.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adaptive_sparse.training.data.images import IMAGE_SUFFIXES, _files_digest, _folder_listing
from adaptive_sparse.training.data.loaders import DatasetError
from adaptive_sparse.training.data.packed import PACK_FORMAT, SPLITS
from adaptive_sparse.training.io import atomic_torch_save

ROOT = Path(__file__).resolve().parents[1]
SOS = 0xDA  # a JPEG's start-of-scan marker: its entropy-coded data follows the scan header


def scan_start(image: bytes) -> int:
    """Where a JPEG's own bytes begin (after its first scan header); 0 for anything else (a PNG's
    bytes are all its own)."""
    if not image.startswith(b"\xff\xd8"):
        return 0
    at = 2
    while at + 4 <= len(image) and image[at] == 0xFF:
        marker, length = image[at + 1], int.from_bytes(image[at + 2:at + 4], "big")
        at += 2 + length
        if marker == SOS:
            return at
    return 0


def class_names(root: Path) -> list[str]:
    """The class folders in label order (sorted, as the folder loader labels them), the same in both splits."""
    names = [sorted(p.name for p in (root / split).iterdir() if p.is_dir()) for split in SPLITS]
    if names[0] != names[1]:
        raise DatasetError(f"{root}: train/ and test/ hold different class folders")
    return names[0]


def pack_split(split_dir: Path, classes: list[str], headers: dict[bytes, int]) -> dict[str, torch.Tensor]:
    """One split's labels, header indices, byte ends and bytes, in the folder loader's file order;
    `headers` (distinct header -> index) grows as new ones appear."""
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted((split_dir / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"no images under {split_dir}")
    body, ends, header_ids = bytearray(), [], []
    for path, _ in files:
        image = path.read_bytes()
        cut = scan_start(image)
        header_ids.append(headers.setdefault(image[:cut], len(headers)))
        body += image[cut:]
        ends.append(len(body))
    labels = [label for _, label in files]
    return {**{key: torch.tensor(values, dtype=torch.int32) for key, values in
               (("labels", labels), ("header", header_ids), ("ends", ends))},
            "body": torch.frombuffer(body, dtype=torch.uint8).clone()}


def pack_folder(root: Path, out: Path) -> dict:
    """Write `root`'s two splits to `out`; returns what was written (images per split, headers, bytes)."""
    classes, headers = class_names(root), {}
    pack = {split: pack_split(root / split, classes, headers) for split in SPLITS}
    pack.update(format=PACK_FORMAT, classes=classes, files=_files_digest(_folder_listing(root)),
                headers=[torch.tensor(list(h), dtype=torch.uint8) for h in headers])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(pack, out)
    return {"images": {split: len(pack[split]["labels"]) for split in SPLITS}, "headers": len(headers),
            "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "cifar10.pack")
    args = parser.parse_args(argv)
    written = pack_folder(args.root, args.out)
    print(f"{args.out}: {written['images']} images, {written['headers']} distinct header(s), "
          f"{written['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
