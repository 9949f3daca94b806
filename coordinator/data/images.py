"""One image at a time: decoding, cropping, flipping and colour noise, with numpy and Pillow only.

These run inside Ray Data's workers, which receive this module by value (loader.py): it must
import nothing but numpy and Pillow, so that a worker starts in well under a second.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

STORED, CROP = 256, 227
PCA_STD = 0.1  # the paper's alpha ~ N(0, 0.1)
# The standard ImageNet statistics (RGB, 0..255): the mean used by the 2012-era models, and the
# RGB covariance's eigen-decomposition widely used for AlexNet-style lighting noise.
IMAGENET_MEAN = (123.68, 116.779, 103.939)
IMAGENET_STD = (58.393, 57.12, 57.375)
IMAGENET_EIGVAL = (0.2175 * 255, 0.0188 * 255, 0.0045 * 255)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class BadImage(Exception):
    """A file that is not a readable image."""


@dataclass(frozen=True)
class ColourStats:
    """Per-channel mean and spread, and the RGB covariance's principal components, on the 0..255 scale.

    eigval holds the spread along each component (the square root of the covariance's eigenvalue),
    the convention of the ImageNet values everyone uses for this noise; eigvec holds them as columns.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, float, float], ...]
    source: str = "computed"

    @staticmethod
    def imagenet() -> "ColourStats":
        return ColourStats(IMAGENET_MEAN, IMAGENET_STD, IMAGENET_EIGVAL, IMAGENET_EIGVEC, source="imagenet")

    @staticmethod
    def from_pixels(pixels: np.ndarray) -> "ColourStats":
        """From an (n, 3) array of RGB pixels."""
        pixels = pixels.astype(np.float64)
        eigval, eigvec = np.linalg.eigh(np.cov(pixels, rowvar=False))
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
        return ColourStats(
            tuple(pixels.mean(axis=0).tolist()),
            tuple(pixels.std(axis=0).tolist()),
            tuple(np.sqrt(eigval).tolist()),
            tuple(map(tuple, eigvec.tolist())),
        )


# --- decoding ---------------------------------------------------------------------------------
MAX_PIXELS = 40_000_000  # what an image may decode to; a bigger one (a decompression bomb?) is refused unread


def load_image(source) -> np.ndarray:
    """(256, 256, 3) uint8 RGB from a path or a binary file object: shorter side rescaled to 256
    (smaller images upscaled), then the centre 256x256. An image that would decode to more than
    MAX_PIXELS is refused from its header, before its pixels are allocated."""
    name = getattr(source, "name", None) or (source if isinstance(source, str) else "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and EXIF chatter
            with Image.open(source) as img:
                img.draft("RGB", (STORED, STORED))  # JPEG: let the decoder downscale by 2/4/8 where it can
                if img.width * img.height > MAX_PIXELS:
                    raise ValueError(
                        f"{img.width}x{img.height} pixels, more than the {MAX_PIXELS // 10**6} million allowed"
                    )
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                scale = STORED / min(img.size)
                size = (max(STORED, round(img.width * scale)), max(STORED, round(img.height * scale)))
                img = img.resize(size, Image.BILINEAR, reducing_gap=3.0)
                left, top = (img.width - STORED) // 2, (img.height - STORED) // 2
                return np.asarray(img.crop((left, top, left + STORED, top + STORED)), dtype=np.uint8)
    except Exception as exc:  # a bad file of any kind is skipped, never fatal
        raise BadImage(f"{name}: {type(exc).__name__}: {exc}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)  # transparent areas become white, as a viewer shows them
    return img.convert("RGB")


# --- augmentation ------------------------------------------------------------------------------
def random_crop_and_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 227x227 window of a 256x256 image, mirrored left-right half the time."""
    top, left = rng.integers(0, STORED - CROP + 1, size=2)
    crop = image[top : top + CROP, left : left + CROP]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def centre_crop(image: np.ndarray) -> np.ndarray:
    offset = (STORED - CROP) // 2
    return image[offset : offset + CROP, offset : offset + CROP]


def ten_crops(image: np.ndarray) -> list[np.ndarray]:
    """The paper's test-time views: four corners and the centre, each with its mirror image."""
    far = STORED - CROP
    views = [image[:CROP, :CROP], image[:CROP, far:], image[far:, :CROP], image[far:, far:], centre_crop(image)]
    return views + [view[:, ::-1] for view in views]


def lighting_shift(stats: ColourStats, rng: np.random.Generator) -> np.ndarray:
    """The PCA colour shift added to every pixel of one image: eigvec @ (alpha * eigval)."""
    alpha = rng.normal(0.0, PCA_STD, size=3)
    return np.asarray(stats.eigvec) @ (alpha * np.asarray(stats.eigval))


class Augment:
    """Ray Data batch transform: decode, then crop (and for training flip and draw a colour shift).

    Bad files come out as rows with ok=False, so the consumer can count and report them.
    """

    def __init__(self, stats: ColourStats, mode: str, seed: int, epoch: int):
        self.stats, self.mode, self.seed, self.epoch = stats, mode, seed, epoch

    def __call__(self, batch: dict) -> dict:
        views = 10 if self.mode == "ten-crop" else 1
        n = len(batch["path"])
        crops = np.zeros((n, views, CROP, CROP, 3), dtype=np.uint8)
        shifts = np.zeros((n, 3), dtype=np.float32)
        ok = np.ones(n, dtype=bool)
        for i, (path, position) in enumerate(zip(batch["path"], batch["position"])):
            try:
                image = load_image(path)
            except BadImage:
                ok[i] = False
                continue
            if self.mode == "train":
                rng = np.random.default_rng([self.seed, self.epoch, int(position)])
                crops[i, 0] = random_crop_and_flip(image, rng)
                shifts[i] = lighting_shift(self.stats, rng)
            elif self.mode == "ten-crop":
                crops[i] = np.stack(ten_crops(image))
            else:
                crops[i, 0] = centre_crop(image)
        return {
            "crops": crops if views > 1 else crops[:, 0],
            "shift": shifts,
            "label": np.asarray(batch["label"]),
            "path": np.asarray(batch["path"]),
            "ok": ok,
        }
