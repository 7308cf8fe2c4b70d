"""Find the image/caption pairs in a dataset folder, and report every file that was left out.

The layout is the one kohya sd-scripts and Hugging Face `imagefolder` read:

    dataset/
      10_zkstyle/            kohya repeat folder: each image is seen 10 times per epoch
        a.png  a.txt         caption in a same-stem .txt (or .caption) file
      more/                  any other folder: 1 repeat; scanned recursively
        b.jpg
        metadata.jsonl       {"file_name": "b.jpg", "text": "..."} per line, names relative to here

Every image is decoded once, so an unreadable file is reported here, not mid-training.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from sd_lora.data.images import DECODE_ERRORS, IMAGE_EXTENSIONS, probe_image
from sd_lora.errors import UserError

METADATA_NAME = "metadata.jsonl"
# kohya's folder convention: "10_zk style" -> 10 repeats, class words "zk style"
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
PROGRESS_MIN_IMAGES = 100  # show a progress bar when checking at least this many images
MAX_ASPECT = 4.0  # longer side over shorter side past which an image is warned about
CLIP_WINDOW = 75  # caption tokens the text encoder reads (77 positions less start and end)
EXPECTED = (
    "Expected image files ({exts}), each captioned by a same-name {caps} file or by a "
    "metadata.jsonl; kohya-style subfolders named N_name repeat their images N times."
)


class DatasetError(UserError):
    """The dataset folder cannot be used; the message says what was found and what is expected."""


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str
    repeats: int = 1
    subset: str = ""  # the folder it counts under in tag_frequency (kohya: the N_name folder)
    loss_weight: float = 1.0  # regularization images: data.regularization_weight
    caption_dropout: float = 0.0  # chance of training with an empty caption instead
    # Train toward the base model's own prediction (adapter off) instead of the noise: the
    # adapter learns to leave this image's prompt as the base draws it.
    preserve: bool = False
    size: tuple[int, int] | None = None  # (width, height) upright, as the scan decoded it
    digest: str = ""  # sha256 of the file's bytes when scanned


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetScan:
    root: Path
    samples: list[Sample]
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[SkippedFile] = field(default_factory=list)
    # Regularization items per epoch trained beside these (sd-scripts' ss_num_reg_images); set
    # by `sd_lora.train.recipe` from the job check, 0 in a plain scan.
    regularization_items: int = 0

    @property
    def num_images(self) -> int:
        return len(self.samples)

    @property
    def num_train_items(self) -> int:
        """Items per epoch: each image counted `repeats` times."""
        return sum(s.repeats for s in self.samples)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{folder: {tag: images}} from comma-separated captions, as sd-scripts' ss_tag_frequency.

        Tags are stripped and lower-cased; each image counts once, whatever its repeats.
        """
        freq: dict[str, Counter] = {}
        for sample in self.samples:
            tags = (t.strip().lower() for t in sample.caption.split(","))
            freq.setdefault(sample.subset, Counter()).update(t for t in tags if t)
        return {folder: dict(counts) for folder, counts in freq.items()}

    def report(self) -> str:
        """A readable summary: counts per folder, then every skipped file and warning."""
        lines = [
            f"Dataset {self.root}: {_plural(self.num_images, 'image')}, "
            f"{_plural(self.num_train_items, 'training item')} per epoch (with repeats)"
        ]
        per_folder = Counter((s.subset, s.repeats) for s in self.samples)
        for (subset, repeats), count in sorted(per_folder.items()):
            lines.append(f"  {subset}: {_plural(count, 'image')} x {_plural(repeats, 'repeat')}")
        for title, entries in (("Skipped", self.skipped), ("Warnings", self.warnings)):
            if entries:
                lines.append(f"{title} ({len(entries)}):")
                lines += [f"  {self._rel(e.path)}: {e.reason}" for e in entries]
        return "\n".join(lines)

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root)) or "."
        except ValueError:
            return str(path)


def scan_dataset(
    root: str | Path,
    caption_extensions: tuple[str, ...] = (".txt", ".caption"),
    min_side: int = 0,
) -> DatasetScan:
    """Scan `root` recursively for images and their captions; decode every image to check it.

    Images whose shorter side is below `min_side` pixels are kept and listed as warnings (they
    will be upscaled). Raises DatasetError when `root` is not a folder or holds no usable image.
    """
    root = Path(root)
    caption_exts = tuple(
        e.lower() if e.startswith(".") else f".{e.lower()}" for e in caption_extensions
    )
    _check_root(root, caption_exts)
    found = _walk(root, caption_exts)
    captions = _CaptionFinder(caption_exts, found)
    samples: list[Sample] = []
    first_with: dict[str, Path] = {}  # content digest -> the first image that has it
    for image, probe in zip(found.images, _probe_all(found.images)):
        sample = _check_image(root, image, probe, captions, min_side, found)
        if sample is None:
            continue
        samples.append(sample)
        twin = first_with.setdefault(probe.digest, image)
        if twin != image:
            found.warn(image, f"same content as {_relative(twin, root)}: this picture trains "
                              "twice as often as the others (delete one copy unless meant)")
    captions.warn_unused()
    _warn_long_captions(samples, found)
    scan = DatasetScan(root, samples, found.skipped, found.warnings)
    if not samples:
        raise DatasetError(_no_images_message(scan, found, caption_exts))
    return scan


def _check_root(root: Path, caption_exts: tuple[str, ...]) -> None:
    expected = _expected(caption_exts)
    if not root.exists():
        raise DatasetError(
            f"dataset folder {root} does not exist (absolute: {root.absolute()}). {expected}"
        )
    if not root.is_dir():
        raise DatasetError(
            f"dataset path {root} is a file, not a folder. Point it at the folder. {expected}"
        )


@dataclass
class _Found:
    images: list[Path] = field(default_factory=list)
    captions: list[Path] = field(default_factory=list)
    metadata: list[Path] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[SkippedFile] = field(default_factory=list)
    n_files: int = 0

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append(SkippedFile(path, reason))

    def warn(self, path: Path, reason: str) -> None:
        self.warnings.append(SkippedFile(path, reason))


def _walk(root: Path, caption_exts: tuple[str, ...]) -> _Found:
    """Sort every file under root into images, captions, metadata and skipped (sorted order)."""
    found = _Found()
    seen_dirs = {os.path.realpath(root)}
    if REPEAT_FOLDER.match(root.name):
        found.warn(root, (
            f"the dataset folder itself is named like a kohya repeat folder ({root.name!r}); "
            "repeats come from its subfolders only: point at its parent to repeat these images"
        ))  # fmt: skip
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        folder_path = Path(folder)
        kept = []
        for d in sorted(dirnames):
            real, path = os.path.realpath(os.path.join(folder, d)), folder_path / d
            if d.startswith(".") or d == "__MACOSX":
                found.skip(path, "hidden or system folder: not scanned")
            elif real in seen_dirs:
                found.skip(path, "link to a folder already scanned: not scanned again")
            else:
                seen_dirs.add(real)
                kept.append(d)
                _check_repeat_name(path, found)
        dirnames[:] = kept
        for name in sorted(filenames):
            found.n_files += 1
            _sort_file(folder_path / name, caption_exts, found)
    return found


def _check_repeat_name(path: Path, found: _Found) -> None:
    match = REPEAT_FOLDER.match(path.name)
    if match and int(match.group(1)) == 0:
        found.warn(path, (
            "folder named like a kohya repeat folder with 0 repeats; its images are used once. "
            "Rename it to 1_... (or move the images out) to make that explicit"
        ))  # fmt: skip


def _sort_file(path: Path, caption_exts: tuple[str, ...], found: _Found) -> None:
    name, ext = path.name, path.suffix.lower()
    if name.startswith("._"):
        found.skip(path, "macOS resource fork ('._' file), not an image")
    elif name.startswith("."):
        found.skip(path, "hidden file")
    elif name == METADATA_NAME:
        found.metadata.append(path)
    elif ext in IMAGE_EXTENSIONS:
        found.images.append(path)
    elif ext in caption_exts:
        found.captions.append(path)
    else:
        found.skip(path, f"not an image or a caption (extension {ext or 'none'!r})")


class EmptyFile(OSError):
    """A zero-byte file: say so rather than pass on the decoder's puzzlement."""


@dataclass(frozen=True)
class _Probe:
    size: tuple[int, int] | Exception  # (width, height) upright, or why it cannot be read
    digest: str = ""  # sha256 of the file's bytes: finds the same picture under two names


def _probe_all(images: list[Path]) -> list[_Probe]:
    """Read and decode every image once (in threads: Pillow decodes without the GIL)."""

    def probe(path: Path) -> _Probe:
        try:
            data = path.read_bytes()
            if not data:
                raise EmptyFile("empty file (0 bytes)")
            return _Probe(probe_image(io.BytesIO(data)), hashlib.sha256(data).hexdigest())
        except DECODE_ERRORS as e:
            return _Probe(e)

    quiet = len(images) < PROGRESS_MIN_IMAGES
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(probe, images)
        return list(tqdm(results, "Checking images", len(images), unit="img", disable=quiet))


def _check_image(
    root: Path,
    image: Path,
    probe: _Probe,
    captions: _CaptionFinder,
    min_side: int,
    found: _Found,
) -> Sample | None:
    """One image and its probe result -> a Sample, or None with the reason recorded in `found`."""
    size = probe.size
    repeats, subset, class_words = _subset_of(root, image)
    try:
        caption, note = captions.caption_for(image)  # first, so its caption counts as claimed
    except _CaptionUnreadable as e:
        found.skip(image, str(e))
        return None
    if isinstance(size, EmptyFile):
        found.skip(image, "empty file (0 bytes)")
        return None
    if isinstance(size, Image.DecompressionBombError):
        found.skip(image, f"too large to decode: {size}")
        return None
    if isinstance(size, Image.UnidentifiedImageError):  # its text names the in-memory buffer
        found.skip(image, "cannot be decoded as an image: its bytes match no image format "
                   "Pillow reads (a damaged download, or another kind of file renamed)")
        return None
    if isinstance(size, Exception):
        found.skip(image, f"cannot be decoded as an image ({type(size).__name__}: {size})")
        return None
    width, height = size
    if caption is None:  # no caption anywhere: sd-scripts uses the folder's class words, else ""
        caption = class_words
        how = f"the folder's class words {class_words!r}" if class_words else "an empty caption"
        note = f"{note}; it trains with {how}, as sd-scripts does"
    if note is not None:
        found.warn(image, note)
    small = size_warning((width, height), min_side)
    if small:
        found.warn(image, small)
    if max(width, height) > MAX_ASPECT * min(width, height):
        kept = min(width, height) / max(width, height)
        found.warn(image, f"{width}x{height} is elongated ({max(width, height) / min(width, height):.1f}:1); "
                          f"a square crop keeps {kept:.0%} of it")
    return Sample(image, caption, repeats, subset, size=(width, height), digest=probe.digest)


def size_warning(size: tuple[int, int], min_side: int) -> str | None:
    """The warning for an image of `size` (width, height) trained at `min_side` px, or None."""
    width, height = size
    if min(width, height) >= min_side:
        return None
    return f"{width}x{height} is below {min_side} px on its shorter side: upscaled"


def _warn_long_captions(samples: list[Sample], found: _Found) -> None:
    """Captions past the CLIP window: the text encoder never reads their end (every SD base
    uses CLIP's tokenizer and its 77 positions: 75 tokens between start and end)."""
    # Every token covers at least one character, so shorter captions need no tokenizer.
    long = [s for s in samples if len(s.caption) > CLIP_WINDOW]
    if not long:
        return
    for sample in long:
        tokens = _count_tokens(sample.caption)
        if tokens > CLIP_WINDOW:
            found.warn(sample.image, (
                f"caption is {tokens} tokens; the text encoder reads the first {CLIP_WINDOW} "
                f"and ignores the rest (from {_words_past_window(sample.caption)!r}...): "
                "shorten it or put what matters first"
            ))  # fmt: skip


def _count_tokens(text: str) -> int:
    return len(_clip_tokenizer()(text, add_special_tokens=False).input_ids)


def _words_past_window(caption: str) -> str:
    """The first words the text encoder does not read (binary search on word prefixes)."""
    words = caption.split()
    low, high = 0, len(words)  # the longest prefix within the window has `low` words
    while low < high:
        mid = (low + high + 1) // 2
        if _count_tokens(" ".join(words[:mid])) <= CLIP_WINDOW:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[low:low + 4])


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    from sd_lora.models.tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 1 << 30  # we count past the window on purpose: no warning
    return tokenizer


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _subset_of(root: Path, image: Path) -> tuple[int, str, str]:
    """(repeats, subset folder name, class words) from the nearest N_name folder under root.

    Without one, the subset is the top-level subfolder (or root itself) and repeats is 1.
    """
    parts = image.relative_to(root).parts[:-1]
    for part in reversed(parts):
        match = REPEAT_FOLDER.match(part)
        if match and int(match.group(1)) > 0:
            return int(match.group(1)), part, match.group(2)  # sd-scripts keeps the underscores
    return 1, parts[0] if parts else root.name, ""


class _CaptionFinder:
    """Captions from metadata.jsonl files (they take precedence) and same-stem caption files."""

    def __init__(self, caption_exts: tuple[str, ...], found: _Found):
        self.caption_exts = caption_exts
        self.files = {(p.parent, p.stem, p.suffix.lower()): p for p in found.captions}
        self.used: set[Path] = set()
        self.claimed: dict[Path, Path] = {}  # caption file -> the first image it captioned
        self.metadata: dict[str, tuple[str, Path, int]] = {}  # image key -> (text, file, line)
        self.found = found
        # Walked top-down, so a deeper metadata.jsonl overrides a shallower one for an image.
        for path in found.metadata:
            self._read_metadata(path)

    def caption_for(self, image: Path) -> tuple[str | None, str | None]:
        """(caption or None when there is none, a note for the report or None).

        Raises _CaptionUnreadable when the caption file exists but cannot be read as UTF-8.
        """
        entry = self.metadata.pop(_key(image), None)
        if entry is not None:
            text, path, line = entry
            return text, None if text else f"empty caption in {path.name} line {line}"
        paths = [self.files.get((image.parent, image.stem, ext)) for ext in self.caption_exts]
        paths = [p for p in paths if p is not None]
        if not paths:
            names = " or ".join(image.stem + ext for ext in self.caption_exts) or "none looked for"
            return None, f"no caption file ({names}) and no metadata.jsonl entry"
        self.used.update(paths)
        caption, note = _read_caption(paths[0])
        other = self.claimed.setdefault(paths[0], image)
        if other != image:
            shared = (f"shares its caption file {paths[0].name} with {other.name} (same name, "
                      f"other extension): give each image its own caption, or rename one")
            note = f"{note}; {shared}" if note else shared
        if len(paths) > 1:
            unused = f"also has {', '.join(p.name for p in paths[1:])}, not used"
            note = f"{note}; {unused}" if note else unused
        return caption, note

    def warn_unused(self) -> None:
        """Warn about caption files no image used, and metadata.jsonl lines naming no image."""
        for path in self.files.values():
            if path not in self.used:
                self.found.warn(path, "caption file without a matching image")
        for _text, path, line in self.metadata.values():
            self.found.warn(path, f"line {line}: file_name names no image in the folder")

    def _read_metadata(self, path: Path) -> None:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            self.found.warn(path, f"cannot be read as UTF-8 text ({e}); file ignored")
            return
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                file_name, text = _parse_metadata_line(line)
            except ValueError as e:
                self.found.warn(path, f"line {number}: {e}; line ignored")
                continue
            self.metadata[_key(path.parent / file_name)] = (text.strip(), path, number)


def _parse_metadata_line(line: str) -> tuple[str, str]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    file_name, text = entry.get("file_name"), entry.get("text")
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f'expected a "file_name" string, got {file_name!r}')
    if not isinstance(text, str):
        raise ValueError(f'expected a "text" string, got {text!r}')
    return file_name, text


class _CaptionUnreadable(Exception):
    """A caption file exists but cannot be read: its image is skipped."""


def _read_caption(path: Path) -> tuple[str, str | None]:
    """(first non-empty line, note) of a UTF-8 caption file; sd-scripts also reads the first line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise _CaptionUnreadable(
            f"caption file {path.name} is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8"
        ) from None
    except OSError as e:
        raise _CaptionUnreadable(f"caption file {path.name} cannot be read ({e})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "", f"caption file {path.name} is empty"
    if len(lines) > 1:
        return lines[0], f"caption file {path.name} has {len(lines)} lines; only the first is used"
    return lines[0], None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _key(path: Path) -> str:
    return os.path.normcase(os.path.normpath(path))


def _no_images_message(scan: DatasetScan, found: _Found, caption_exts: tuple[str, ...]) -> str:
    head = (
        f"no usable images in dataset folder {scan.root}: found {_plural(found.n_files, 'file')}, "
        f"{len(found.images)} of them with an image extension; none could be used."
    )
    listed = [f"  {scan._rel(e.path)}: {e.reason}" for e in scan.skipped[:20]]
    if len(scan.skipped) > 20:
        listed.append(f"  ... and {len(scan.skipped) - 20} more")
    skipped = ["Skipped:", *listed] if listed else []
    return "\n".join([head, *skipped, _expected(caption_exts)])


def _expected(caption_exts: tuple[str, ...]) -> str:
    caps = " or ".join(caption_exts) or "caption"
    return EXPECTED.format(exts=", ".join(IMAGE_EXTENSIONS), caps=caps)


def regularization_layout(style_items: int, reg_images: int) -> tuple[int, int]:
    """(repeats, images used) so that regularization fills about as many items per epoch as
    the style: a small folder is repeated, a large one cut to its first `style_items`."""
    repeats = max(1, style_items // reg_images)
    return repeats, min(reg_images, style_items)
