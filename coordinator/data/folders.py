"""Finding a dataset's files: the ImageFolder layout, class names, and the held-out split."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says what to fix."""


def _class_folders(root: Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is not a folder")
    classes = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not classes:
        raise DatasetError(f"{root} has no class folders: expected the ImageFolder layout root/<class>/<image>")
    return classes


def _images_in(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _no_images(root: Path) -> DatasetError:
    return DatasetError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in them")


CHECK_BUDGET = 10_000  # files and folders check_folder looks at before it gives up


def check_folder(root: Path) -> list[str]:
    """The class folders' names; fails fast, saying what to fix, unless `root` holds class folders
    with an image among the first CHECK_BUDGET entries (so a root of / answers at once, unwalked)."""
    folders, seen = _class_folders(root), 0
    for folder in folders:
        for _, subfolders, files in os.walk(folder):
            if any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in files):
                return [f.name for f in folders]
            seen += len(files) + len(subfolders)
            if seen >= CHECK_BUDGET:
                raise DatasetError(
                    f"no image among the first {CHECK_BUDGET} entries under {str(root)[:200]}: "
                    "expected the ImageFolder layout root/<class>/<image>"
                )
    raise _no_images(root)


def scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class folders (sorted) and (path, class index) for every image file under them."""
    folders = _class_folders(root)
    samples = [(str(path), index) for index, folder in enumerate(folders) for path in _images_in(folder)]
    if not samples:
        raise _no_images(root)
    return [f.name for f in folders], samples


def read_class_names(path: Optional[Path], classes: Sequence[str]) -> list[str]:
    """Human-readable labels from lines like 'n01440764 tench'; folder names where a line is missing."""
    if path is None:
        return list(classes)
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class names file {path} does not exist")
    names = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            names[parts[0]] = parts[1].split(",")[0].strip() if len(parts) > 1 else parts[0]
    return [names.get(c, c) for c in classes]


def looks_like_imagenet(classes: Sequence[str]) -> bool:
    return len(classes) == 1000 and all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes)


def hash_fraction(path: str) -> float:
    """A stable number in [0, 1) from a file's class folder and name: the held-out split's coin."""
    name = Path(path)
    key = f"{name.parent.name}/{name.name}".encode()
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "little") / 2**64
