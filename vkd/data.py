"""Datasets: CIFAR-10/100 (torchvision, or the CIFAR-10 JPEG archive), ImageNet-style ImageFolders,
stratified fractions, and a tensor-resident loader that augments on the device.

Small datasets (CIFAR) are decoded once into a uint8 tensor (N, 3, 32, 32), cached under ``data/``,
and served by :class:`TensorLoader`, which does the standard CIFAR augmentation (random crop with
4-pixel padding, horizontal flip) with tensor ops on CPU or GPU -- no per-image Python work, so small
models are not starved by the loader.
"""

from __future__ import annotations

import copy
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import auto_augment
from torchvision import datasets
from tqdm.auto import tqdm

from .paths import check_fraction, progress_default, resolve, save_atomic

ARCHIVE_ENV = "VKD_CIFAR10_ARCHIVE"
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
DATASETS = ("cifar10", "cifar10-jpeg", "cifar100")
STATS = {  # per-dataset channel mean / std of the training images (the standard CRD / mdistiller values)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"cifar10": 10, "cifar10-jpeg": 10, "cifar100": 100}


def stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Channel mean and std (0-1 scale) used to normalise dataset ``name``."""
    return STATS["cifar100" if name == "cifar100" else "imagenet" if name == "imagenet" else "cifar10"]


class DataNotFoundError(FileNotFoundError):
    """A dataset is not where vkd looked; the message says where it looked and how to provide it."""


def _archive_candidates(root: Path) -> list[Path]:
    env = os.environ.get(ARCHIVE_ENV)
    return ([Path(env).expanduser()] if env else []) + [root / ARCHIVE_NAME]


def cifar10_jpeg_dir(root: str | Path = "data") -> Path:
    """``root/cifar10`` with train/ and test/ ImageFolders, extracted once from the JPEG archive.

    The archive is taken from ``$VKD_CIFAR10_ARCHIVE`` or ``root/cifar10-jpeg.tar.gz``."""
    root = resolve(root)
    target = root / "cifar10"
    if _has_both_splits(target):
        return target
    archive = next((p for p in _archive_candidates(root) if p.is_file()), None)
    if archive is None:
        looked = ", ".join(str(p) for p in [target, *_archive_candidates(root)])
        raise DataNotFoundError(
            f"CIFAR-10 (JPEG) not found; looked in: {looked}. Put {ARCHIVE_NAME} in {root} or set "
            f"{ARCHIVE_ENV}=/path/to/{ARCHIVE_NAME}; or use dataset 'cifar10' with download=True when online."
        )
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
            extracted = next((d.parent for d in Path(tmp).rglob("train") if _has_both_splits(d.parent)), None)
            if extracted is None:
                raise DataNotFoundError(f"{archive} holds no CIFAR-10 in ImageFolder layout: expected a folder with "
                                        f"train/ and test/, each with one folder of images per class")
            try:  # one atomic rename: the complete tree appears at once, and only one process's does
                os.rename(extracted, target)
            except OSError:  # another process's rename came first
                if not _has_both_splits(target):
                    raise
    except tarfile.TarError:
        raise DataNotFoundError(f"{archive} is not a readable tar archive (truncated, or another kind of file); "
                                f"expected {ARCHIVE_NAME}, see data/README.md") from None
    return target


def _has_both_splits(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def image_dataset(name: str, split: str, root: str | Path = "data", download: bool = False, transform=None):
    """The torchvision dataset ``name`` (DATASETS) for ``split`` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = resolve(root)
    if name == "cifar10-jpeg":
        return datasets.ImageFolder(cifar10_jpeg_dir(root) / split, transform=transform)
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            return cls(root, train=split == "train", download=download, transform=transform)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            raise DataNotFoundError(
                f"{name} not found in {root} ({error}). Pass download=True when online, or use "
                f"'cifar10-jpeg' with the offline archive (see data/README.md)."
            ) from None
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS} (or use imagefolder())")


def imagefolder(path: str | Path, split: str, transform=None) -> datasets.ImageFolder:
    """An ImageNet-style ``path/<split>/<class>/*.JPEG`` folder."""
    folder = resolve(path) / split
    expected = f"expected {folder}/<class name>/<images>, e.g. ImageNet's train/ and val/ with one folder per class"
    if not folder.is_dir():
        raise DataNotFoundError(f"no ImageFolder at {folder}: {expected}")
    try:
        return datasets.ImageFolder(folder, transform=transform)
    except FileNotFoundError as error:  # torchvision found no class folder, or no image in them
        raise DataNotFoundError(f"{error} ({expected})") from None


def _posterize(img, bits_to_keep, **__):
    """timm's RandAugment posterize, also for 0 bits kept: a black image, as Pillow < 11 gave.

    The DeiT policy "rand-m9-mstd0.5-inc1" draws 0 bits at its highest magnitude; timm (1.0.x)
    passes that to Pillow, whose newer versions refuse it ("bits must be between or equal to 1 and
    8") and would stop a training run at a random step."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def use_compatible_posterize() -> None:
    """Make timm's RandAugment use :func:`_posterize` (see there); called before building transforms."""
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


def evaluation_split(path: str | Path) -> str:
    """``"val"`` (ImageNet's name) if ``path/val`` exists, else ``"test"``."""
    return "val" if (resolve(path) / "val").is_dir() else "test"


def folder_subset(dataset: datasets.ImageFolder, indices) -> datasets.ImageFolder:
    """A shallow copy of ``dataset`` holding only the samples at ``indices``."""
    subset = copy.copy(dataset)
    subset.samples = [dataset.samples[i] for i in indices]
    subset.imgs, subset.targets = subset.samples, [label for _, label in subset.samples]
    return subset


def small_imagefolder(source: str | Path, target: str | Path, per_class: int, size: int | None = None) -> Path:
    """``target/{train,val}/<class>/`` with the first ``per_class`` images of each class of ``source``'s
    train/ and test/ (or val/) ImageFolders, resized to ``size`` px when given; kept if already built."""
    source, target = resolve(source), resolve(target)
    if (target / "train").is_dir() and (target / "val").is_dir():
        return target
    for split, name in (("train", "train"), (evaluation_split(source), "val")):
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            out = target / name / folder.name
            out.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir())[:per_class]:
                image = Image.open(path).convert("RGB")
                (image.resize((size, size), Image.BICUBIC) if size else image).save(out / path.name)
    return target


def stratified_indices(targets, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified random ``fraction`` of the samples (at least one per class)."""
    check_fraction(fraction)
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        count = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen))


@dataclass
class TensorData:
    """A whole image dataset as tensors: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def subset(self, indices) -> TensorData:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return TensorData(self.images[index], self.labels[index], self.classes)


def load_tensor_data(name: str, split: str, root: str | Path = "data", download: bool = False,
                     progress: bool | None = None) -> TensorData:
    """Decode dataset ``name`` once into uint8 tensors, cached as ``root/<name>-<split>.pt`` (``progress``: a
    tqdm bar while decoding; by default unless ``$VKD_PROGRESS`` is "0")."""
    root = resolve(root)
    cache = root / f"{name}-{split}.pt"
    if cache.is_file():
        return TensorData(**torch.load(cache))
    dataset = image_dataset(name, split, root, download)
    if isinstance(dataset, datasets.ImageFolder):
        images = np.stack([np.asarray(dataset.loader(path).convert("RGB")) for path, _ in
                           tqdm(dataset.samples, desc=f"decoding {name} {split}", mininterval=5,
                                disable=not (progress_default() if progress is None else progress))])
        labels = np.asarray(dataset.targets)
    else:
        images, labels = np.asarray(dataset.data), np.asarray(dataset.targets)
    data = TensorData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                      torch.from_numpy(labels).long(), list(dataset.classes))
    root.mkdir(parents=True, exist_ok=True)
    save_atomic(vars(data), cache)  # processes decoding at once each write a whole file; the last one stays
    return data


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that draws epoch ``epoch``'s order (and, for :class:`TensorLoader`, its crops and flips)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(n: int, train: bool, generator: torch.Generator | None = None, rank: int = 0,
                world: int = 1) -> torch.Tensor:
    """The sample indices one process visits in an epoch.

    Training: a permutation drawn from ``generator`` (:func:`epoch_generator`, the same on every
    process), cut to a multiple of ``world`` and dealt out so that process ``rank`` takes every
    ``world``-th index.  Evaluation: every ``world``-th index in order (each sample once over all processes)."""
    if not train:
        return torch.arange(rank, n, world)
    order = torch.randperm(n, generator=generator)
    return order[: n // world * world][rank::world]


def share_size(n: int, train: bool, rank: int = 0, world: int = 1) -> int:
    """``len(epoch_order(n, train, ..., rank, world))``, without drawing the order."""
    return n // world if train else len(range(rank, n, world))


def batches(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


class TensorLoader:
    """Batches ``(images, labels, indices)`` from a :class:`TensorData`, normalised and augmented on ``device``.

    ``indices`` (B,) are the samples' positions in the data (for per-sample caches).
    ``augment=True``: random crop with zero padding ``pad`` and horizontal flip, drawn per sample from
    a generator seeded with (seed, epoch), so an epoch's batches are reproducible (exact resume).
    With ``world`` > 1 processes, each serves its share (:func:`epoch_order`) in batches of ``batch_size``.
    The images are gathered, augmented and normalised ``chunk_size`` at a time (whole batches) and the
    batches are slices of that: a few tensor operations per chunk instead of per step, which on a GPU
    keeps the host ahead of small models' steps.  Default: 8192 images on a GPU, one batch on the CPU
    (where those operations cost little next to a step, and cache-sized ones are faster: an epoch of
    CIFAR-10 at batch 64 takes 0.8 s per batch and 1.5 s in chunks of 8192 on 2 cores).  Every operation
    is per element, so the batches do not depend on ``chunk_size``."""

    def __init__(self, data: TensorData, batch_size: int, mean, std, train: bool, device: str | torch.device = "cpu",
                 pad: int = 4, seed: int = 0, drop_last: bool | None = None, rank: int = 0, world: int = 1,
                 chunk_size: int | None = None):
        self.device = torch.device(device)
        self.images, self.labels = data.images.to(self.device), data.labels.to(self.device)
        self.batch_size, self.train, self.pad, self.seed = batch_size, train, pad, seed
        self.rank, self.world = rank, world
        self.chunk_size = chunk_size or (8192 if self.device.type == "cuda" else batch_size)
        self.drop_last = train if drop_last is None else drop_last
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.epoch = 0

    def __len__(self) -> int:
        return batches(share_size(len(self.labels), self.train, self.rank, self.world), self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _crops_and_flips(self, sizes: list[int], generator: torch.Generator) -> torch.Tensor:
        """(3, sum(sizes)) offsets dy, dx and flip flags on the device -- drawn batch by batch in the order the
        batches use them, but copied to the device once an epoch (a copy from host memory waits for the GPU
        to finish its queue; one per step would keep the host from running ahead)."""
        draws = []
        for n in sizes:
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
            flip = torch.rand(n, generator=generator) < 0.5
            draws.append(torch.stack([dy, dx, flip.long()]))
        return torch.cat(draws, 1).to(self.device) if draws else torch.zeros(3, 0, dtype=torch.long)

    def _augment(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        padded = F.pad(images, (self.pad,) * 4)
        dy, dx, flip = draws[0], draws[1], draws[2].bool()
        rows = (dy[:, None] + torch.arange(h, device=self.device)).view(n, 1, h, 1)
        cols = torch.arange(w, device=self.device).expand(n, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
        batch = torch.arange(n, device=self.device).view(n, 1, 1, 1)
        channel = torch.arange(images.shape[1], device=self.device).view(1, -1, 1, 1)
        return padded[batch, channel, rows, cols.view(n, 1, 1, w)]

    def chunks(self):
        """The epoch as ``(images, labels, indices, batch sizes)`` of consecutive runs of whole batches, about
        ``chunk_size`` images each; the batches are the chunks' slices of those sizes."""
        per_chunk = max(1, self.chunk_size // self.batch_size)
        generator = epoch_generator(self.seed, self.epoch)  # draws the order, then the crops and flips
        order = epoch_order(len(self.labels), self.train, generator, self.rank, self.world).to(self.device)
        sizes = [min(self.batch_size, len(order) - i * self.batch_size) for i in range(len(self))]
        draws = self._crops_and_flips(sizes, generator) if self.train else None
        start = 0
        for first in range(0, len(sizes), per_chunk):
            chunk_sizes = sizes[first:first + per_chunk]
            end = start + sum(chunk_sizes)
            index = order[start:end]
            images = self.images[index].float()
            if self.train:
                images = self._augment(images, draws[:, start:end])
            yield (images - self.mean) / self.std, self.labels[index], index, chunk_sizes
            start = end

    def __iter__(self):
        for images, labels, index, sizes in self.chunks():
            yield from zip(images.split(sizes), labels.split(sizes), index.split(sizes), strict=True)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        image, label = self.dataset[index]
        return image, label, index


class FolderLoader:
    """Batches ``(images, labels, indices)`` from an image-file dataset (e.g. ImageNet's ImageFolder)
    through a torch DataLoader with ``workers`` processes; the dataset's transform does the
    augmentation and normalisation.  Same interface, sharding and reproducibility as
    :class:`TensorLoader`: the order and the workers' random streams are seeded by (seed, epoch, rank)."""

    def __init__(self, dataset, batch_size: int, train: bool, device: str | torch.device = "cpu", workers: int = 4,
                 seed: int = 0, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.device, self.workers, self.seed, self.rank, self.world = torch.device(device), workers, seed, rank, world
        self.labels = torch.as_tensor(dataset.targets)
        self.epoch = 0

    def __len__(self) -> int:
        return batches(share_size(len(self.labels), self.train, self.rank, self.world), self.batch_size, self.train)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = epoch_order(len(self.labels), self.train, epoch_generator(self.seed, self.epoch), self.rank, self.world)
        generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank)  # workers
        loader = torch.utils.data.DataLoader(
            _Indexed(self.dataset, order), self.batch_size, shuffle=False, num_workers=self.workers,
            drop_last=self.train, pin_memory=self.device.type == "cuda", generator=generator,
            persistent_workers=False)
        for images, labels, index in loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                   index.to(self.device))

    def chunks(self):
        """The epoch's batches in :meth:`TensorLoader.chunks`' form, a chunk of one batch each."""
        for images, labels, index in self:
            yield images, labels, index, [len(labels)]


def test_batch(name: str, count: int, seed: int = 0, root: str | Path = "data", download: bool = False):
    """A fixed, class-stratified batch of about ``count`` normalised test images and their labels."""
    test = load_tensor_data(name, "test", root, download)
    chosen = test.subset(stratified_indices(test.labels, min(1.0, count / len(test.labels)), seed))
    images, labels, _ = next(iter(TensorLoader(chosen, len(chosen.labels), *stats(name), train=False)))
    return images, labels

