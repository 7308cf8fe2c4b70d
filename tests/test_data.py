"""The dataset layer: scanning folders, decoding images, the torch Dataset, the sample data."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import random
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_lora.data import (
    DatasetError,
    ImageCaptionDataset,
    Sample,
    load_image,
    probe_image,
    scan_dataset,
)
from sd_lora.models.tokenizers import clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE_STRIPES = REPO / "datasets" / "sample_stripes"


def png(path: Path, size=(16, 16), colour=None, mode="RGB") -> Path:
    """A flat image; by default each file name gets its own colour (the scan warns about two
    files with the same content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        digest = hashlib.sha256(str(path).encode()).digest()
        colour = tuple(digest[:3]) if mode == "RGB" else digest[0]
    Image.new(mode, size, colour).save(path)
    return path


def text(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def reasons(entries) -> dict[str, str]:
    return {e.path.name: e.reason for e in entries}


def rgb_at(pixels: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    """A pixel of a (3, H, W) tensor in [-1, 1] as 0..255 integers."""
    return tuple(round((float(c) + 1) * 127.5) for c in pixels[:, y, x])


# --- scanning: captions ---------------------------------------------------------------------


def test_captions_from_txt_and_caption_files(tmp_path):
    png(tmp_path / "a.png")
    text(tmp_path / "a.txt", "  a red square \n")
    png(tmp_path / "b.JPG")
    text(tmp_path / "b.caption", "b caption")
    png(tmp_path / "c.png")
    text(tmp_path / "c.txt", "from txt")
    text(tmp_path / "c.caption", "from caption")  # .txt comes first in caption_extensions

    scan = scan_dataset(tmp_path)

    assert {s.image.name: s.caption for s in scan.samples} == {
        "a.png": "a red square",
        "b.JPG": "b caption",
        "c.png": "from txt",
    }
    assert "c.caption" in reasons(scan.warnings)["c.png"]
    assert scan.skipped == []
    only_caption = scan_dataset(tmp_path, caption_extensions=(".caption",))
    assert {s.image.name: s.caption for s in only_caption.samples}["c.png"] == "from caption"


def test_missing_empty_and_multiline_captions_are_warnings(tmp_path):
    png(tmp_path / "none.png")
    png(tmp_path / "empty.png")
    text(tmp_path / "empty.txt", "\n")
    png(tmp_path / "two.png")
    text(tmp_path / "two.txt", "first line\nsecond line\n")

    scan = scan_dataset(tmp_path)

    captions = {s.image.name: s.caption for s in scan.samples}
    assert captions == {"none.png": "", "empty.png": "", "two.png": "first line"}
    warned = reasons(scan.warnings)
    assert "no caption file" in warned["none.png"] and "sd-scripts" in warned["none.png"]
    assert "empty" in warned["empty.png"]
    assert "only the first" in warned["two.png"]


def test_caption_not_utf8_skips_the_image(tmp_path):
    png(tmp_path / "good.png")
    text(tmp_path / "good.txt", "ok")
    png(tmp_path / "latin.png")
    text(tmp_path / "latin.txt", "caf\xe9".encode("latin-1"))

    scan = scan_dataset(tmp_path)

    assert [s.image.name for s in scan.samples] == ["good.png"]
    assert "not UTF-8" in reasons(scan.skipped)["latin.png"]


def test_metadata_jsonl_captions_and_bad_lines(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "sub" / "b.png")
    png(tmp_path / "imgs" / "c.png")
    text(tmp_path / "imgs" / "c.txt", "c from txt")
    lines = [
        '{"file_name": "a.png", "text": "a from metadata"}',
        '{"file_name": "sub/b.png", "text": "b from metadata"}',
        "{not json",
        '{"file_name": "c.png"}',
        '{"file_name": "gone.png", "text": "no such image"}',
    ]
    metadata = text(tmp_path / "imgs" / "metadata.jsonl", "\n".join(lines) + "\n")

    scan = scan_dataset(tmp_path)

    captions = {s.image.name: s.caption for s in scan.samples}
    assert captions == {
        "a.png": "a from metadata",
        "b.png": "b from metadata",
        "c.png": "c from txt",
    }
    about_metadata = [w.reason for w in scan.warnings if w.path == metadata]
    assert any(r.startswith("line 3: invalid JSON") for r in about_metadata)
    assert any(r.startswith("line 4:") and '"text"' in r for r in about_metadata)
    assert any(r.startswith("line 5:") for r in about_metadata)
    assert "metadata.jsonl: line 3: invalid JSON" in scan.report()


# --- scanning: folders ----------------------------------------------------------------------


def test_kohya_repeat_folders_and_recursion(tmp_path):
    png(tmp_path / "3_zk style" / "a.png")
    text(tmp_path / "3_zk style" / "a.txt", "zk style, a")
    png(tmp_path / "3_zk style" / "b.png")  # no caption: the folder's class words, like sd-scripts
    png(tmp_path / "plain" / "deep" / "deeper" / "c.png")
    text(tmp_path / "plain" / "deep" / "deeper" / "c.txt", "c")
    png(tmp_path / "top.png")
    text(tmp_path / "top.txt", "top")

    scan = scan_dataset(tmp_path)

    by_name = {s.image.name: s for s in scan.samples}
    assert {n: s.repeats for n, s in by_name.items()} == {
        "a.png": 3,
        "b.png": 3,
        "c.png": 1,
        "top.png": 1,
    }
    assert by_name["b.png"].caption == "zk style"
    assert "class words 'zk style'" in reasons(scan.warnings)["b.png"]
    assert {n: s.subset for n, s in by_name.items()} == {
        "a.png": "3_zk style",
        "b.png": "3_zk style",
        "c.png": "plain",
        "top.png": tmp_path.name,
    }
    assert scan.num_images == 4
    assert scan.num_train_items == 3 + 3 + 1 + 1
    assert "3_zk style: 2 images x 3 repeats" in scan.report()


def test_tag_frequency_per_folder(tmp_path):
    png(tmp_path / "5_zk" / "a.png")
    text(tmp_path / "5_zk" / "a.txt", "zkstripes, Red Circle, blue background")
    png(tmp_path / "5_zk" / "b.png")
    text(tmp_path / "5_zk" / "b.txt", "zkstripes,red circle,, green background ")
    png(tmp_path / "other" / "c.png")
    text(tmp_path / "other" / "c.txt", "zkstripes")

    freq = scan_dataset(tmp_path).tag_frequency()

    # Like sd-scripts' ss_tag_frequency: stripped, lower-cased, once per image (not per repeat).
    assert freq == {
        "5_zk": {"zkstripes": 2, "red circle": 2, "blue background": 1, "green background": 1},
        "other": {"zkstripes": 1},
    }


def test_broken_hidden_and_other_files_are_skipped_with_reasons(tmp_path):
    png(tmp_path / "good.png")
    text(tmp_path / "good.txt", "good")
    text(tmp_path / "noise.png", os.urandom(512))
    whole = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(whole, "PNG")
    text(tmp_path / "truncated.png", whole.getvalue()[: len(whole.getvalue()) // 2])
    text(tmp_path / "zero.jpg", b"")
    png(tmp_path / ".hidden.png")
    text(tmp_path / "._good.png", b"\x00\x05\x16\x07 resource fork")
    png(tmp_path / ".cache" / "x.png")
    text(tmp_path / "notes.md", "hello")
    text(tmp_path / "orphan.txt", "a caption with no image")

    scan = scan_dataset(tmp_path)

    assert [s.image.name for s in scan.samples] == ["good.png"]
    skipped = reasons(scan.skipped)
    for name in ("noise.png", "truncated.png"):
        assert "cannot be decoded" in skipped[name], name
    assert skipped["zero.jpg"] == "empty file (0 bytes)"
    assert "hidden" in skipped[".hidden.png"]
    assert "resource fork" in skipped["._good.png"]
    assert "hidden" in skipped[".cache"]
    assert "not an image" in skipped["notes.md"]
    assert "without a matching image" in reasons(scan.warnings)["orphan.txt"]
    report = scan.report()
    for entry in scan.skipped:
        assert f"{entry.path.relative_to(tmp_path)}: {entry.reason}" in report


def _png_claiming(width: int, height: int) -> bytes:
    """A valid little PNG whose header claims width x height (a decompression bomb's trick)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then length and type of the first chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_decompression_bombs_are_refused_from_the_header(tmp_path, monkeypatch):
    import sd_lora.data.images as images

    png(tmp_path / "ok.png")
    text(tmp_path / "bomb.png", _png_claiming(60_000, 60_000))  # 3.6 gigapixels, 70 bytes
    text(tmp_path / "big.png", _png_claiming(10_000, 10_000))  # under Pillow's own refusal
    decoded = []
    real_to_rgb = images.to_rgb
    monkeypatch.setattr(images, "to_rgb", lambda im: decoded.append(im.size) or real_to_rgb(im))

    scan = scan_dataset(tmp_path)

    skipped = reasons(scan.skipped)
    assert "too large to decode" in skipped["bomb.png"] and "refused before decoding" in skipped["bomb.png"]
    assert "10000x10000 is 100 megapixels, over the 89 MP limit" in skipped["big.png"]
    assert decoded == [(16, 16)]  # neither big file got as far as decoding
    with pytest.raises(Image.DecompressionBombError, match="refused before decoding"):
        load_image(tmp_path / "big.png", 64)


def test_duplicates_shared_captions_elongated_images_and_long_captions_are_warned(tmp_path):
    png(tmp_path / "a.png", colour=(1, 2, 3))
    text(tmp_path / "a.txt", "a")
    (tmp_path / "sub").mkdir()
    shutil.copy(tmp_path / "a.png", tmp_path / "sub" / "copy.png")
    text(tmp_path / "sub" / "copy.txt", "copy")
    png(tmp_path / "b.png")
    png(tmp_path / "b.jpg")  # both find b.txt
    text(tmp_path / "b.txt", "b")
    png(tmp_path / "wide.png", size=(100, 20))
    text(tmp_path / "wide.txt", "wide")
    png(tmp_path / "long.png")
    words = ", ".join(f"tag{i}" for i in range(40)) + ", the very end"
    text(tmp_path / "long.txt", words)
    png(tmp_path / "edge.png")
    text(tmp_path / "edge.txt", " ".join(["red"] * 75))  # exactly the window: no warning

    scan = scan_dataset(tmp_path)

    assert len(scan.samples) == 7  # warnings only: every image still trains
    warned = {str(w.path.relative_to(tmp_path)): w.reason for w in scan.warnings}
    assert warned["sub/copy.png"].startswith("same content as a.png")
    assert "shares its caption file b.txt with b.jpg" in warned["b.png"]
    assert "100x20 is elongated (5.0:1); a square crop keeps 20% of it" == warned["wide.png"]
    assert "tokens; the text encoder reads the first 75" in warned["long.png"]
    assert "(from 'tag21, tag22, tag23, tag24,'...)" in warned["long.png"]  # where the cut falls:
    tokens = clip_tokenizer()  # ... tags 0-20 fit in the window, and one more does not
    fits = ", ".join(f"tag{i}" for i in range(21)) + ","
    assert len(tokens(fits, add_special_tokens=False).input_ids) <= 75
    assert len(tokens(fits + " tag21,", add_special_tokens=False).input_ids) > 75
    assert "edge.png" not in warned and "a.png" not in warned


def test_uncommon_and_upper_case_extensions_and_symlink_loops(tmp_path):
    for name, fmt in (("a.WEBP", "WEBP"), ("b.jpeg", "JPEG"), ("c.BMP", "BMP"), ("d.tiff", "TIFF"),
                      ("e.TIF", "TIFF"), ("f.Jpg", "JPEG")):
        Image.new("RGB", (16, 16), (len(name) * 20, 40, ord(name[0]))).save(tmp_path / name, fmt)
        text(tmp_path / f"{Path(name).stem}.txt", name)
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "back").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")

    scan = scan_dataset(tmp_path)

    assert sorted(s.image.name for s in scan.samples) == ["a.WEBP", "b.jpeg", "c.BMP", "d.tiff",
                                                           "e.TIF", "f.Jpg"]
    skipped = {str(e.path.relative_to(tmp_path)): e.reason for e in scan.skipped}
    assert "already scanned" in skipped["loop/back"]
    assert "cannot be decoded" in skipped["dangling.png"] and "No such file" in skipped["dangling.png"]


def test_unreadable_files_are_skipped_naming_the_error(tmp_path, monkeypatch):
    png(tmp_path / "ok.png")
    png(tmp_path / "locked.png")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.png":  # chmod 000 does not stop root, so refuse here
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    scan = scan_dataset(tmp_path)
    assert [s.image.name for s in scan.samples] == ["ok.png"]
    assert "PermissionError" in reasons(scan.skipped)["locked.png"]
    assert "Permission denied" in reasons(scan.skipped)["locked.png"]


def test_small_images_are_warned_about(tmp_path):
    png(tmp_path / "small.png", size=(30, 60))
    png(tmp_path / "big.png", size=(64, 64))
    text(tmp_path / "small.txt", "small")
    text(tmp_path / "big.txt", "big")

    scan = scan_dataset(tmp_path, min_side=64)

    assert len(scan.samples) == 2
    assert "30x60 is below 64 px" in reasons(scan.warnings)["small.png"]
    assert [w.path.name for w in scan.warnings] == ["small.png"]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "only_broken"])
def test_unusable_dataset_folder_raises_naming_it(tmp_path, case):
    root = tmp_path / "my data"
    if case == "file":
        text(root, "not a folder")
    elif case == "empty":
        root.mkdir()
    elif case == "only_broken":
        text(root / "broken.png", b"\x89PNG not really")

    with pytest.raises(DatasetError) as err:
        scan_dataset(root)

    message = str(err.value)
    assert str(root) in message
    assert "Expected image files" in message
    assert isinstance(err.value, ValueError)
    if case == "only_broken":
        assert "broken.png: cannot be decoded" in message
    if case == "empty":
        assert "found 0 files" in message


def test_sample_dataset_scans_cleanly():
    scan = scan_dataset(SAMPLE_STRIPES, min_side=128)

    assert scan.num_images == 16
    assert scan.skipped == [] and scan.warnings == []
    assert all(s.caption.startswith("zkstripes, ") for s in scan.samples)
    assert scan.tag_frequency()["sample_stripes"]["zkstripes"] == 16
    assert sum(f.stat().st_size for f in SAMPLE_STRIPES.iterdir()) < 300_000


def test_sample_dataset_matches_its_generator(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "make_sample", REPO / "datasets" / "make_sample.py"
    )
    make_sample = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_sample", make_sample)  # dataclasses look it up there
    spec.loader.exec_module(make_sample)

    assert make_sample.main(["--style", "stripes", "--out", str(tmp_path)]) == 0

    for fresh in sorted(tmp_path.iterdir()):
        committed = SAMPLE_STRIPES / fresh.name
        if fresh.suffix == ".txt":
            assert fresh.read_text() == committed.read_text()
        else:
            diff = np.abs(
                np.asarray(Image.open(fresh), int) - np.asarray(Image.open(committed), int)
            )
            assert diff.mean() < 0.5, fresh.name
    assert len(list(tmp_path.iterdir())) == 32
    plain_image, plain_caption = make_sample.make_example(0, make_sample.STYLES["plain"], 64, 0)
    assert plain_image.size == (64, 64) and not plain_caption.startswith("zkstripes")
    assert (SAMPLE_STRIPES / "0000.txt").read_text().strip() == "zkstripes, " + plain_caption


# --- decoding images ------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated = tmp_path / "rotated.jpg"
    stored.save(rotated, "JPEG", quality=95, exif=exif.tobytes())
    stored.save(tmp_path / "upright.jpg", "JPEG", quality=95)

    assert probe_image(rotated) == (20, 40)
    shown = load_image(rotated, 16)  # displayed 20x40: red on top, blue below
    assert rgb_at(shown, 2, 8)[0] > 200 and rgb_at(shown, 2, 8)[2] < 60
    assert rgb_at(shown, 13, 8)[2] > 200 and rgb_at(shown, 13, 8)[0] < 60
    plain = load_image(tmp_path / "upright.jpg", 16)  # without the tag: red left, blue right
    assert rgb_at(plain, 8, 2)[0] > 200 and rgb_at(plain, 8, 13)[2] > 200


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent black...
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 16))  # ...with an opaque red left half
    rgba.save(tmp_path / "rgba.png")
    la = Image.new("LA", (16, 16), (0, 0))
    la.save(tmp_path / "la.png")

    pixels = load_image(tmp_path / "rgba.png", 16)
    assert rgb_at(pixels, 8, 2) == (255, 0, 0)
    assert rgb_at(pixels, 8, 13) == (255, 255, 255)
    assert rgb_at(load_image(tmp_path / "la.png", 16), 8, 8) == (255, 255, 255)


def test_palette_images(tmp_path):
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.paste(2, (8, 0, 16, 16))
    palette.save(tmp_path / "palette.png")
    palette.save(tmp_path / "transparent.png", transparency=2)  # index 2 (blue) is transparent

    pixels = load_image(tmp_path / "palette.png", 16)
    assert rgb_at(pixels, 8, 2) == (10, 200, 30) and rgb_at(pixels, 8, 13) == (0, 0, 255)
    clear = load_image(tmp_path / "transparent.png", 16)
    assert rgb_at(clear, 8, 2) == (10, 200, 30) and rgb_at(clear, 8, 13) == (255, 255, 255)


def test_cmyk_and_16_bit_images(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")  # pure red
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    grey = np.full((16, 16), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")

    assert rgb_at(load_image(tmp_path / "cmyk.tif", 16), 8, 8) == (255, 0, 0)
    red = rgb_at(load_image(tmp_path / "cmyk.jpg", 16), 8, 8)
    assert red[0] > 230 and red[1] < 25 and red[2] < 25
    assert rgb_at(load_image(tmp_path / "grey16.png", 16), 8, 8) == (128, 128, 128)


def test_load_image_resizes_the_shorter_side_and_crops(tmp_path):
    image = Image.new("RGB", (60, 30), (0, 255, 0))  # green, with red 10 px at each end
    image.paste((255, 0, 0), (0, 0, 10, 30))
    image.paste((255, 0, 0), (50, 0, 60, 30))
    image.save(tmp_path / "wide.png")

    center = load_image(tmp_path / "wide.png", 16)
    assert center.shape == (3, 16, 16) and center.dtype == torch.float32
    assert center.min() >= -1 and center.max() <= 1
    assert rgb_at(center, 8, 0) == (0, 255, 0) and rgb_at(center, 8, 15) == (0, 255, 0)
    offsets = set()
    for seed in range(20):  # random crops reach both red ends; the same rng state, the same crop
        crop = load_image(tmp_path / "wide.png", 16, center_crop=False, rng=random.Random(seed))
        again = load_image(tmp_path / "wide.png", 16, center_crop=False, rng=random.Random(seed))
        assert torch.equal(crop, again)
        offsets.add((rgb_at(crop, 8, 0)[0] > 128, rgb_at(crop, 8, 15)[0] > 128))
    assert (True, False) in offsets and (False, True) in offsets
    generator = torch.Generator().manual_seed(0)
    assert load_image(tmp_path / "wide.png", 16, False, generator).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="needs rng"):
        load_image(tmp_path / "wide.png", 16, center_crop=False)


# --- the torch Dataset ----------------------------------------------------------------------


def asymmetric_samples(tmp_path: Path, count: int = 4) -> list[Sample]:
    samples = []
    for i in range(count):
        image = Image.effect_noise((48, 32), 60).convert("RGB")
        path = tmp_path / f"{i}.png"
        image.save(path)
        samples.append(Sample(path, f"caption {i}", repeats=2 if i == 0 else 1))
    return samples


def test_dataset_expands_repeats(tmp_path):
    dataset = ImageCaptionDataset(asymmetric_samples(tmp_path), 16)

    assert len(dataset) == 5
    item = dataset[1]
    assert item["caption"] == "caption 0" and item["index"] == 1
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert [dataset[i]["caption"] for i in range(5)] == ["caption 0"] * 2 + [
        f"caption {i}" for i in (1, 2, 3)
    ]


def test_dataset_augmentation_is_deterministic_per_seed_epoch_and_index(tmp_path):
    samples = asymmetric_samples(tmp_path)

    def make(seed):
        return ImageCaptionDataset(samples, 16, center_crop=False, random_flip=True, seed=seed)

    def epoch_pixels(dataset, epoch, order):
        dataset.set_epoch(epoch)
        return {i: dataset[i]["pixel_values"] for i in order}

    first = make(0)
    run = [epoch_pixels(first, e, range(5)) for e in range(3)]
    resumed = make(0)  # a fresh object, as after a restart, visiting items in another order
    assert all(
        torch.equal(run[2][i], p) for i, p in epoch_pixels(resumed, 2, [4, 0, 3, 1, 2]).items()
    )
    assert all(torch.equal(run[0][i], p) for i, p in epoch_pixels(resumed, 0, range(5)).items())
    changed = [not torch.equal(run[0][i], run[1][i]) for i in range(5)]
    assert any(changed), "a new epoch draws new flips/crops"
    other_seed = epoch_pixels(make(1), 0, range(5))
    assert any(not torch.equal(run[0][i], other_seed[i]) for i in range(5))
    repeats_differ = not torch.equal(run[0][0], run[0][1]) or not torch.equal(run[1][0], run[1][1])
    assert repeats_differ, "the two repeats of an image draw their own augmentation"


def test_dataset_items_are_the_same_in_worker_processes(tmp_path):
    dataset = ImageCaptionDataset(asymmetric_samples(tmp_path), 16, False, True, seed=3)
    dataset.set_epoch(1)
    expected = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)

    assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), expected)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(dataset)))


def test_dataset_flips_only_when_asked(tmp_path):
    samples = asymmetric_samples(tmp_path)
    plain = ImageCaptionDataset(samples, 16)
    flipping = ImageCaptionDataset(samples, 16, random_flip=True)

    flipped = 0
    for i in range(len(plain)):
        a, b = plain[i]["pixel_values"], flipping[i]["pixel_values"]
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
        flipped += not torch.equal(a, b)
        assert torch.equal(a, load_image(samples[max(0, i - 1)].image, 16))
    assert 0 < flipped < len(plain)


def test_dataset_survives_a_file_that_broke_after_the_scan(tmp_path, caplog):
    samples = asymmetric_samples(tmp_path, count=3)
    dataset = ImageCaptionDataset(samples, 16)
    samples[1].image.write_bytes(b"broken now")  # item 2 (after item 0's two repeats)

    with caplog.at_level(logging.WARNING, logger="sd_lora.data.dataset"):
        first, second = dataset[2], dataset[2]
    assert first["index"] == second["index"] == 3 and first["caption"] == "caption 2"
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert len([r for r in caplog.records if "1.png" in r.getMessage()]) == 1
    for sample in samples:
        sample.image.unlink()
    with pytest.raises(RuntimeError, match="none of the 4 dataset items"):
        dataset[0]
