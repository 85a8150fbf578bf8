"""Image classification: a small CNN over a folder of images with one subfolder per class.

    task: {name: image, options: {image_size: 16, channels: 1}}
    data: {path: ./data/digits}   # <path>/<class name>/<image>.png|.jpg|...

Classes are the sorted subfolder names. Which images are held out is decided by a hash of each
file's relative path (about ``data.val_fraction`` of every class, stable as files are added).
Training images get a seeded random shift of up to ``max_shift`` pixels: the shift depends only
on (seed, epoch, sample id), so a batch is the same at any world size and after any restart.
The demo data are the 1797 8x8 handwritten digits that ship with scikit-learn, written once as
PNG files (``pip install scikit-learn`` for the demo only).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
from pydantic import Field, PositiveInt
from torch import nn

from training.core import storage
from training.tasks import ClassificationTask, Loaded, Options, TaskError, derive_generator

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm")


class ImageOptions(Options):
    image_size: PositiveInt = Field(16, description="Images are resized to this square size.")
    channels: int = Field(1, ge=1, le=3, description="1 (grayscale) or 3 (RGB).")
    width: PositiveInt = Field(
        32, multiple_of=8, description="Channels of the first conv layer (a multiple of 8)."
    )
    max_shift: int = Field(2, ge=0, description="Augmentation: random shift in pixels.")


class Images:
    """Decoded images as one uint8 tensor [N, C, H, W] and their labels."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ImageInfo:
    """What ``load`` learns that the model depends on."""

    num_classes: int  # class subfolders


class ImageClassification(ClassificationTask[ImageInfo]):
    Options = ImageOptions
    options: ImageOptions
    augment = True  # the contract tests switch it off to compare with and without

    # ---- driver ---------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        classes, files = self._listing()
        train, val = self._split(files)
        listing = [(posixpath.relpath(f, self.data.path), s) for f, _, s in files]
        return {
            "format": "image-folder",
            "train_samples": len(train),
            "val_samples": len(val),
            "classes": classes,
            "files_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
        }

    def write_demo(self) -> None:
        write_digits(self.data.fs, self.data.path)
        print(f"Wrote scikit-learn's 8x8 handwritten digits as PNG files to {self.data.uri}")

    def _listing(self) -> tuple[list[str], list[tuple[str, int, int]]]:
        """Class names and (path, label, size) of every image, in a stable order."""
        fs = self.data.fs
        if fs.get_file_info(self.data.path).type != pafs.FileType.Directory:
            raise TaskError(
                f"data.path '{self.data.uri}' must be a directory with one subfolder per class"
            )
        classes = sorted(
            e.base_name
            for e in storage.list_dir(fs, self.data.path)
            if e.type == pafs.FileType.Directory
        )
        if len(classes) < 2:
            raise TaskError(
                f"data.path '{self.data.uri}' has {len(classes)} class subfolders; need >= 2"
            )
        files = []
        for label, name in enumerate(classes):
            entries = storage.list_dir(fs, posixpath.join(self.data.path, name))
            files += [
                (e.path, label, e.size)
                for e in sorted(entries, key=lambda e: e.path)
                if e.type == pafs.FileType.File and e.base_name.lower().endswith(EXTENSIONS)
            ]
        if not files:
            raise TaskError(
                f"data.path '{self.data.uri}' holds no images ({', '.join(EXTENSIONS)})"
            )
        return classes, files

    def _split(self, files: list[Any]) -> tuple[list[Any], list[Any]]:
        def held_out(path: str) -> bool:
            digest = hashlib.sha256(posixpath.relpath(path, self.data.path).encode()).digest()
            return int.from_bytes(digest[:4], "little") / 2**32 < self.data.val_fraction

        return ([f for f in files if not held_out(f[0])], [f for f in files if held_out(f[0])])

    # ---- workers --------------------------------------------------------------------------
    def load(self) -> Loaded[ImageInfo]:
        classes, files = self._listing()
        train, val = (self._decode(split) for split in self._split(files))
        return Loaded(train, val, ImageInfo(len(classes)))

    def _decode(self, files: list[tuple[str, int, int]]) -> Images:
        from PIL import Image

        mode = "L" if self.options.channels == 1 else "RGB"
        size = (self.options.image_size,) * 2
        pixels = torch.empty(len(files), self.options.channels, *size, dtype=torch.uint8)
        for i, (path, _, _) in enumerate(files):
            with Image.open(io.BytesIO(storage.read_bytes(self.data.fs, path))) as image:
                array = image.convert(mode).resize(size, Image.BILINEAR)
                pixels[i] = (
                    torch.frombuffer(bytearray(array.tobytes()), dtype=torch.uint8)
                    .view(*size, self.options.channels)
                    .permute(2, 0, 1)
                )
        return Images(pixels, torch.tensor([label for _, label, _ in files], dtype=torch.int64))

    def build_model(self, info: ImageInfo) -> nn.Module:
        return SmallCNN(self.options.channels, self.options.width, info.num_classes)

    def batch(
        self, samples: Images, ids: torch.Tensor, seed: int, *, training: bool
    ) -> tuple[torch.Tensor, ...]:
        images = samples.pixels[ids].float() / 255.0
        shift = self.options.max_shift
        if self.augment and shift and training:  # evaluation sees the images as they are
            padded = nn.functional.pad(images, (shift,) * 4)
            size = images.shape[-1]
            for row, sample in enumerate(ids.tolist()):
                dy, dx = torch.randint(
                    0, 2 * shift + 1, (2,), generator=derive_generator(seed, sample)
                ).tolist()
                images[row] = padded[row, :, dy : dy + size, dx : dx + size]
        return (images - 0.5) / 0.5, samples.labels[ids]


class SmallCNN(nn.Module):
    """GroupNorm, not BatchNorm: no running buffers for DDP to broadcast every step, and the
    result does not depend on how the global batch is split across ranks."""

    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # keeps a coarse layout: where the strokes are matters
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def write_digits(fs: pafs.FileSystem, root: str) -> None:
    """scikit-learn's digits (1797 real 8x8 scans, 16 grey levels) as PNG files per class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TaskError(
            "the image demo data come from scikit-learn: pip install scikit-learn "
            "(or point data.path at your own folder of images, one subfolder per class)"
        ) from None
    from PIL import Image

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        buffer = io.BytesIO()
        Image.fromarray((image * 255 / 16).astype("uint8"), mode="L").save(buffer, "PNG")
        path = posixpath.join(root, str(int(label)), f"{index:04d}.png")
        storage.write_bytes(fs, path, buffer.getvalue())
