"""The input path on real image files: formats, bad files, splits, augmentation, ten-crop."""

import io
import math
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coordinator.data import DatasetError, batches, open_dataset
from coordinator.data.images import (
    CROP,
    STORED,
    BadImage,
    ColourStats,
    centre_crop,
    lighting_shift,
    load_image,
    random_crop_and_flip,
    ten_crops,
)
from coordinator.data.loader import EarlyStart
from coordinator.data.patterns import KINDS, draw, generate


def gradient_image(width, height, mode="RGB"):
    """A picture whose pixel values say where they came from (red grows left to right, green top to bottom)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 80)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode) if mode != "RGB" else Image.fromarray(rgb)


@pytest.fixture
def mixed_folder(tmp_path):
    """One class of every awkward kind of file the loader must handle, and two bad files."""
    good = tmp_path / "train" / "n01440764"
    other = tmp_path / "train" / "n01443537"
    good.mkdir(parents=True)
    other.mkdir(parents=True)
    gradient_image(320, 240).save(good / "rgb.jpg")
    gradient_image(300, 400, "L").save(good / "grey.jpg")
    gradient_image(260, 260, "CMYK").save(good / "cmyk.jpg")
    gradient_image(280, 280).convert("P", palette=Image.ADAPTIVE).save(good / "palette.png")
    rgba = gradient_image(256, 300).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(good / "alpha.png")
    gradient_image(20, 12).save(good / "tiny.bmp")
    gradient_image(400, 300).save(good / "web.webp")
    buffer = io.BytesIO()
    gradient_image(300, 300).save(buffer, "JPEG")
    (other / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (other / "empty.jpg").write_bytes(b"")
    gradient_image(300, 300).save(other / "fine.png")
    (other / "notes.txt").write_text("not an image, not listed")
    return tmp_path


def test_every_format_decodes_to_rgb_256(mixed_folder):
    for path in sorted((mixed_folder / "train" / "n01440764").iterdir()):
        image = load_image(str(path))
        assert image.shape == (STORED, STORED, 3) and image.dtype == np.uint8, path.name


def test_decoding_keeps_the_picture(mixed_folder):
    image = load_image(str(mixed_folder / "train" / "n01440764" / "rgb.jpg")).astype(int)
    # Shorter side 240 -> 256, then the centre: red still grows left to right, green top to bottom.
    assert image[128, 250, 0] - image[128, 5, 0] > 100
    assert image[250, 128, 1] - image[5, 128, 1] > 150
    grey = load_image(str(mixed_folder / "train" / "n01440764" / "grey.jpg"))
    assert np.array_equal(grey[..., 0], grey[..., 1])  # greyscale becomes equal channels
    alpha = load_image(str(mixed_folder / "train" / "n01440764" / "alpha.png")).astype(int)
    assert alpha[..., 2].mean() > 150  # half-transparent blue 80 over white


def test_bad_files_raise_badimage(mixed_folder):
    for name in ("truncated.jpg", "empty.jpg"):
        with pytest.raises(BadImage, match=name):
            load_image(str(mixed_folder / "train" / "n01443537" / name))


def test_loader_gives_tensors_and_counts_skips(ray_session, mixed_folder):
    dataset = open_dataset(mixed_folder / "train", val_fraction=0.5, stats="imagenet")
    samples = dataset.train + dataset.val
    assert len(samples) == 10  # the .txt file is not an image
    seen, bad = 0, []
    for batch in batches(samples, dataset.stats, batch_size=4, mode="eval"):
        assert batch.images.shape[1:] == (3, CROP, CROP) and batch.images.dtype == torch.float32
        assert len(batch.images) == len(batch.labels)
        seen += len(batch.labels)
        bad += batch.bad_paths
    assert seen == 8
    assert sorted(Path(p).name for p in bad) == ["empty.jpg", "truncated.jpg"]


def test_training_survives_bad_files_and_reports_them(ray_session, mixed_folder, caplog):
    from coordinator.training import run_spec, train

    events = []
    result = train(
        mixed_folder / "train",
        run_spec("demo", {"epochs": 2, "batch_size": 4, "width": 0.125, "val_fraction": 0.5, "steps_per_epoch": 2}),
        on_event=events.append,
    )
    assert result.state == "finished" and result.steps > 0
    assert result.skipped == 2
    assert events[-1].skipped == 2
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 2  # each bad file said once, though both epochs met them


def test_class_names_file_and_synset_folders(tmp_path):
    for synset in ("n01440764", "n01443537"):
        (tmp_path / synset).mkdir()
        for i in range(12):
            gradient_image(64, 64).save(tmp_path / synset / f"{i}.png")
    names = tmp_path / "synsets.txt"
    names.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    dataset = open_dataset(tmp_path, class_names=names, stats="imagenet")
    assert dataset.classes == ["n01440764", "n01443537"]
    assert dataset.labels == ["tench", "goldfish"]


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(50):
            gradient_image(32, 32).save(tmp_path / c / f"{i}.png")
    first = open_dataset(tmp_path, val_fraction=0.2, stats="imagenet")
    again = open_dataset(tmp_path, val_fraction=0.2, stats="imagenet")
    assert first.val == again.val and first.train == again.train
    assert not set(first.val) & set(first.train)
    assert len(first.val) + len(first.train) == 100
    assert 8 <= len(first.val) <= 35


def test_held_out_folder_is_used_when_given(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            gradient_image(32, 32).save(tmp_path / split / c / "x.png")
    dataset = open_dataset(tmp_path / "train", tmp_path / "val", stats="imagenet")
    assert [Path(p).parts[-3] for p, _ in dataset.val] == ["val", "val"]
    assert len(dataset.train) == 2


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("file", "is not a folder"),
        ("empty", "no class folders"),
        ("no-images", "no images"),
    ],
)
def test_unusable_datasets_say_what_to_fix(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout in ("empty", "no-images"):
        root.mkdir()
        if layout == "no-images":
            (root / "cats").mkdir()
            (root / "cats" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=message):
        open_dataset(root)


def test_random_crop_bounds_and_flip():
    rows, cols = np.mgrid[0:STORED, 0:STORED]
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)  # each pixel names its place
    rng = np.random.default_rng(0)
    offsets, flips = set(), 0
    for _ in range(500):
        crop = random_crop_and_flip(image, rng)
        assert crop.shape == (CROP, CROP, 3)
        top = int(crop[0, 0, 0])
        flipped = crop[0, 0, 1] > crop[0, -1, 1]
        left = int(crop[0, -1, 1] if flipped else crop[0, 0, 1])
        assert 0 <= top <= STORED - CROP and 0 <= left <= STORED - CROP
        window = image[top : top + CROP, left : left + CROP]
        assert np.array_equal(crop, window[:, ::-1] if flipped else window)
        offsets.add((top, left))
        flips += bool(flipped)
    assert len(offsets) > 300  # positions spread over the 30 x 30 possible offsets
    assert 200 < flips < 300  # about half are mirrored


def test_flip_really_mirrors():
    image = np.zeros((STORED, STORED, 3), np.uint8)
    image[:, :10] = 255  # a bright band on the left edge
    rng = np.random.default_rng(3)
    left_bright = [random_crop_and_flip(image, rng)[:, :5].mean() > 200 for _ in range(200)]
    right_bright = [random_crop_and_flip(image, rng)[:, -5:].mean() > 200 for _ in range(200)]
    assert any(left_bright) and any(right_bright)


def test_pca_noise_has_the_stated_statistics():
    stats = ColourStats.imagenet()
    rng = np.random.default_rng(0)
    shifts = np.stack([lighting_shift(stats, rng) for _ in range(20000)])
    vec, val = np.asarray(stats.eigvec), np.asarray(stats.eigval)
    expected = vec @ np.diag((0.1 * val) ** 2) @ vec.T  # alpha ~ N(0, 0.1) along each component
    assert np.abs(shifts.mean(axis=0)).max() < 0.05 * math.sqrt(expected.trace())
    assert np.allclose(np.cov(shifts, rowvar=False), expected, rtol=0.05, atol=0.02 * expected.trace())
    # Projected on the components, the shifts are independent with spread 0.1 x eigval.
    along = shifts @ vec
    assert np.allclose(along.std(axis=0), 0.1 * val, rtol=0.05)


def test_evaluation_is_deterministic(ray_session, tmp_path):
    generate(tmp_path / "p", train_per_class=2, val_per_class=1)
    dataset = open_dataset(tmp_path / "p" / "train", tmp_path / "p" / "val", stats="imagenet")
    first = torch.cat([b.images for b in batches(dataset.val, dataset.stats, 4, "eval")])
    again = torch.cat([b.images for b in batches(dataset.val, dataset.stats, 4, "eval")])
    assert torch.equal(first, again)
    train_a = torch.cat([b.images for b in batches(dataset.train, dataset.stats, 8, "train", seed=1, epoch=0)])
    train_b = torch.cat([b.images for b in batches(dataset.train, dataset.stats, 8, "train", seed=1, epoch=1)])
    assert not torch.equal(train_a, train_b)  # training views change with the epoch


def test_a_pass_started_early_has_its_first_batch_before_it_is_read_and_the_same_batches(ray_session, tmp_path):
    generate(tmp_path / "p", train_per_class=3, val_per_class=1)
    dataset = open_dataset(tmp_path / "p" / "train", tmp_path / "p" / "val", stats="imagenet")

    def one_pass():
        return batches(dataset.train, dataset.stats, 8, "train", seed=3, epoch=2)

    early = EarlyStart(one_pass())
    early._first.result(timeout=120)  # fetched with nobody reading
    with closing(early):
        started_early = list(early)
    plain = list(one_pass())
    assert [len(b.labels) for b in started_early] == [8, 8, 8, 6]
    assert all(
        torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(started_early, plain)
    )


def test_a_pass_started_early_can_be_closed_unread_or_midway_and_reports_its_errors(ray_session, tmp_path):
    generate(tmp_path / "p", train_per_class=3, val_per_class=1)
    dataset = open_dataset(tmp_path / "p" / "train", tmp_path / "p" / "val", stats="imagenet")
    EarlyStart(batches(dataset.train, dataset.stats, 8, "train")).close()
    with closing(EarlyStart(batches(dataset.train, dataset.stats, 8, "train"))) as early:
        assert len(next(iter(early)).labels) == 8
    with pytest.raises(ValueError, match="mode must be train, eval or ten-crop"):
        list(EarlyStart(batches(dataset.train, dataset.stats, 8, "sideways")))


def test_closing_a_pass_whose_first_batch_is_still_coming_does_not_wait_for_it():
    release, ended = threading.Event(), threading.Event()

    def slow_pass():  # a pipeline whose first batch takes as long as the test says
        try:
            release.wait()
            yield "first batch"
        finally:
            ended.set()

    early = EarlyStart(slow_pass())
    closer = threading.Thread(target=early.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive() and not ended.is_set()  # close() returned with the batch still coming
    release.set()
    assert ended.wait(timeout=10)  # and the pipeline ended as soon as it came


def test_ten_crop_views_are_the_papers():
    image = np.random.default_rng(0).integers(0, 256, (STORED, STORED, 3), dtype=np.uint8)
    views = ten_crops(image)
    far = STORED - CROP
    corners = [image[:CROP, :CROP], image[:CROP, far:], image[far:, :CROP], image[far:, far:]]
    expected = corners + [centre_crop(image)]
    assert len(views) == 10
    for i, view in enumerate(expected):
        assert np.array_equal(views[i], view)
        assert np.array_equal(views[i + 5], view[:, ::-1])
    offset = (STORED - CROP) // 2
    assert np.array_equal(centre_crop(image), image[offset : offset + CROP, offset : offset + CROP])


def test_colour_stats_from_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.normal([100, 120, 140], [30, 20, 10], size=(50000, 3))
    stats = ColourStats.from_pixels(pixels)
    assert np.allclose(stats.mean, [100, 120, 140], atol=0.5)
    assert np.allclose(stats.std, [30, 20, 10], rtol=0.02)
    assert np.allclose(sorted(stats.eigval, reverse=True), [30, 20, 10], rtol=0.02)


def test_builtin_dataset_is_deterministic_and_not_a_pixel_shortcut(tmp_path):
    a = generate(tmp_path / "a", train_per_class=3, val_per_class=1, seed=5)
    b = generate(tmp_path / "b", train_per_class=3, val_per_class=1, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == len(KINDS) * 4
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train" / "classes.txt").read_text().splitlines()[0] == "hstripes horizontal stripes"
    # Colours are drawn independently of the class: the mean colour of a class says nothing.
    means = np.array([[draw(k, np.random.default_rng([9, i])).mean() for i in range(20)] for k in KINDS])
    assert means.std(axis=1).min() > 10


def test_generation_is_skipped_when_already_there(tmp_path):
    root = generate(tmp_path / "p", train_per_class=1, val_per_class=1)
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert generate(tmp_path / "p", train_per_class=1, val_per_class=1) == root
    assert (root / "dataset.json").stat().st_mtime_ns == stamp


def test_checking_a_folder_looks_at_a_bounded_number_of_entries(tmp_path):
    """A request's data_dir is checked before a job is accepted: a huge tree without images (the
    disk's root, /proc) must answer at once, not after a walk of all of it."""
    from coordinator.data import DatasetError, check_folder
    from coordinator.data.folders import CHECK_BUDGET

    deep = tmp_path / "root" / "a"
    for i in range(CHECK_BUDGET // 50 + 10):  # more entries than the budget, and no image among them
        (deep / f"d{i}").mkdir(parents=True)
        for j in range(50):
            (deep / f"d{i}" / f"f{j}.txt").touch()
    (tmp_path / "root" / "z" / "late").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "root" / "z" / "late" / "0.png")  # beyond the budget: not reached
    with pytest.raises(DatasetError, match=f"no image among the first {CHECK_BUDGET} entries"):
        check_folder(tmp_path / "root")  # it stopped at the budget: the image in z/ exists but was not reached
    assert check_folder(tmp_path / "root" / "z") == ["late"]  # images one folder down are found
