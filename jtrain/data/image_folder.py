"""`images:DIR` sources: a folder of PNG/JPEG images per class, the folder's name the label.

`DIR/CLASS/*.png` puts each image in the split of a hash of its bytes (the same picture
always lands in the same split); `DIR/train/CLASS/*`, `DIR/val/CLASS/*` and `DIR/test/CLASS/*`
(chosen when DIR has a `train` folder) keep the dataset's own splits. Images are read with
Pillow, converted to RGB and resized to `image_size` x `image_size` (bilinear), as float32 in
[0, 1]. A file that is not an image, cannot be decoded, or lies outside a class folder is
skipped and counted with its path; files and folders whose names start with "." are ignored.
`read_images` reads a folder of unlabelled images the same way, for `jtrain.predict`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os

import numpy as np

from jtrain.data.records import SPLITS, Skipped
from jtrain.data.supervised import RawSplit, SourceError, bad_rows, hashed_split

SUFFIXES = (".png", ".jpg", ".jpeg")
_THREADS = 8  # Pillow decodes without holding the GIL


def allowed(kind: str) -> tuple[str, ...]:
    """How an error lists this kind."""
    return (f"{kind}:DIR",)


def _visible(names: list[str]) -> list[str]:
    return sorted(name for name in names if not name.startswith("."))


def _roots(location: str) -> dict[str | None, str]:
    """{split: folder of class folders}; the split None: hashed."""
    root = os.path.expanduser(location)
    if os.path.isdir(os.path.join(root, "train")):
        return {s: os.path.join(root, s) for s in SPLITS if os.path.isdir(os.path.join(root, s))}
    return {None: root}


def check(kind: str, location: str, *, target: str, features: tuple[str, ...]) -> None:
    """Checks that DIR is a directory with at least one class folder."""
    if not os.path.isdir(os.path.expanduser(location)):
        raise SourceError(f"{location!r} is not a directory")
    for root in _roots(location).values():
        if any(os.path.isdir(os.path.join(root, n)) for n in _visible(os.listdir(root))):
            return
    raise SourceError(f"{location!r} has no class folders; put images in DIR/CLASS/*.png")


def _listing(location: str, skipped: dict[str, Skipped]) -> list[tuple[str, str, str | None]]:
    """(path, class, split or None) of every image file; other files go to `skipped`."""
    found = []
    for split, root in _roots(location).items():
        counted = skipped[split or "train"]
        for name in _visible(os.listdir(root)):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                counted.add(folder, "no_class", "not inside a class folder")
                continue
            found += [(path, name, split) for path in _image_files(folder, counted)]
    return found


def _image_files(folder: str, skipped: Skipped) -> list[str]:
    """Every PNG/JPEG file under `folder`, in walk order; other files go to `skipped`."""
    found = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = _visible(dirs)
        for file in _visible(files):
            path = os.path.join(base, file)
            if file.lower().endswith(SUFFIXES):
                found.append(path)
            else:
                skipped.add(path, "not_image", f"not one of {', '.join(SUFFIXES)}")
    return found


def _read_image(path: str, size: int) -> tuple[np.ndarray | None, str, str]:
    """(pixels or None, sha256 of the bytes or "", why there are no pixels)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return None, "", f"cannot read it ({err})"
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except Exception as err:  # a corrupt file can fail in many ways inside a Pillow plugin
        return None, digest, f"cannot decode it ({type(err).__name__}: {err})"
    return np.asarray(resized, dtype=np.float32) / 255.0, digest, ""


def _read_all(paths: list[str], size: int) -> list[tuple[np.ndarray | None, str, str]]:
    """`_read_image` of every path, in order, on a few threads."""
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(lambda path: _read_image(path, size), paths))


def _check_size(image_size: int) -> None:
    if image_size < 1:
        raise ValueError(f"data.image_size={image_size} must be a positive number of pixels.")


def load(
    kind: str, location: str, *, target: str, features: tuple[str, ...], image_size: int
) -> dict[str, RawSplit]:
    """Reads every image into a RawSplit per split (data.target and data.features unused)."""
    check(kind, location, target=target, features=features)
    _check_size(image_size)
    skipped = {split: Skipped() for split in SPLITS}
    found = _listing(location, skipped)
    read = _read_all([path for path, _, _ in found], image_size)
    images: dict[str, list] = {split: [] for split in SPLITS}
    labels: dict[str, list] = {split: [] for split in SPLITS}
    for (path, label, given), (pixels, digest, why) in zip(found, read, strict=True):
        split = given or (hashed_split(digest) if digest else "train")
        if pixels is None:
            skipped[split].add(path, "unreadable", why)
            continue
        images[split].append(pixels)
        labels[split].append(label)
    out = {s: _raw_split(images[s], labels[s], image_size, skipped[s]) for s in SPLITS}
    if not len(out["train"]):
        raise ValueError(
            f"data.source='{kind}:{location}' has no readable train images "
            f"({skipped['train'].total} skipped); put PNG or JPEG files in DIR/CLASS/."
        )
    return out


def read_images(directory: str, image_size: int) -> tuple[np.ndarray, list[str], dict]:
    """The images to predict under `directory` (searched recursively, by sorted path), read
    and resized as training reads them: (float32 [N, size, size, 3] in [0, 1], the path of
    each, the files skipped as RawSplit.bad)."""
    if not os.path.isdir(os.path.expanduser(directory)):
        raise ValueError(f"{directory!r} is not a directory")
    _check_size(image_size)
    skipped = Skipped()
    paths = sorted(_image_files(os.path.expanduser(directory), skipped))
    images, kept = [], []
    for path, (pixels, _, why) in zip(paths, _read_all(paths, image_size), strict=True):
        if pixels is None:
            skipped.add(path, "unreadable", why)
        else:
            images.append(pixels)
            kept.append(path)
    return _stacked(images, image_size), kept, bad_rows(skipped)


def _stacked(images: list, size: int) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.float32)


def _raw_split(images: list, labels: list, size: int, skipped: Skipped) -> RawSplit:
    target = np.empty(len(labels), dtype=object)
    target[:] = labels
    return RawSplit({"image": _stacked(images, size)}, target, None, bad_rows(skipped))
