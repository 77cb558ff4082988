"""Data: torchvision's data sets, held as tensors, served in batches made on the device.

``load_dataset`` reads Fashion-MNIST, MNIST or CIFAR-10 through torchvision's own classes and
keeps the whole split as one ``uint8`` tensor. ``TensorLoader`` moves that tensor to the device
once and makes every batch there: it indexes, converts to float, augments (random crop with
zero padding, horizontal flip) and normalises whole batches at a time, instead of running a
per-image PIL pipeline in worker processes.

Where the files live: the ``root`` argument, else ``$EFFICIENTML_DATA``, else
``~/.cache/efficientml/data`` (``$XDG_CACHE_HOME`` is honoured). The layout is torchvision's:
``ROOT/FashionMNIST/raw``, ``ROOT/MNIST/raw``, ``ROOT/cifar-10-batches-py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets


class DataMissingError(FileNotFoundError):
    """A data set's files are not under the data root and could not be downloaded."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the package knows of a data set: its torchvision class and its conventions."""
    tv_class: type
    folder: str            # where torchvision keeps it under the root
    mean: tuple[float, ...]  # per-channel pixel mean of the training split, in [0, 1]
    std: tuple[float, ...]   # per-channel pixel standard deviation of the training split
    crop_padding: int      # zero padding (pixels) for the random-crop augmentation
    hflip: bool            # whether a mirrored image is still an image of the same class
    shape: tuple[int, int, int]  # (C, H, W) of one image
    num_classes: int = 10


DATASETS: dict[str, DatasetSpec] = {
    # Clothes look like clothes in a mirror; digits do not.
    "fashion-mnist": DatasetSpec(datasets.FashionMNIST, "FashionMNIST", (0.2860,), (0.3530,), 2, True, (1, 28, 28)),
    "mnist": DatasetSpec(datasets.MNIST, "MNIST", (0.1307,), (0.3081,), 2, False, (1, 28, 28)),
    "cifar10": DatasetSpec(datasets.CIFAR10, "cifar-10-batches-py",
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True, (3, 32, 32)),
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder data sets are read from: ``root``, else ``$EFFICIENTML_DATA``, else a user cache."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("EFFICIENTML_DATA"):
        return Path(os.environ["EFFICIENTML_DATA"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "efficientml" / "data"


@dataclass
class ImageDataset:
    """A whole split of an image data set as tensors.

    images: ``uint8`` tensor of shape (N, C, H, W), pixel values 0..255.
    labels: ``int64`` tensor of shape (N,), class indices 0..len(classes)-1.
    """
    name: str
    train: bool
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    hflip: bool = False
    indices: torch.Tensor | None = field(default=None, repr=False)  # rows of the full split, if a subset

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise TypeError(f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def class_counts(self) -> torch.Tensor:
        """Number of examples of each class, shape (num_classes,)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, n_per_class: int, seed: int = 0) -> "ImageDataset":
        """A class-balanced subset: ``n_per_class`` examples of every class, chosen by ``seed``.

        The same (n_per_class, seed) always gives the same examples, in a class-interleaved order.
        """
        if not isinstance(n_per_class, int) or n_per_class < 1:
            raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
        counts = self.class_counts()
        if int(counts.min()) < n_per_class:
            raise ValueError(f"{self.name} has only {int(counts.min())} examples of its rarest class; "
                             f"cannot take {n_per_class} per class")
        g = torch.Generator().manual_seed(seed)
        picks = []
        for c in range(self.num_classes):
            rows = torch.nonzero(self.labels == c).squeeze(1)
            picks.append(rows[torch.randperm(len(rows), generator=g)[:n_per_class]])
        rows = torch.stack(picks, dim=1).reshape(-1)  # interleave classes: c0, c1, ..., c0, c1, ...
        base = self.indices if self.indices is not None else torch.arange(len(self))
        return replace(self, images=self.images[rows], labels=self.labels[rows], indices=base[rows])


    def select_classes(self, classes: list[int]) -> "ImageDataset":
        """Only the examples of ``classes`` (original indices), relabelled 0..len(classes)-1 in
        the order given; how Chapter 4 splits Fashion-MNIST into a source and a target task."""
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes) or not all(
                isinstance(c, int) and 0 <= c < self.num_classes for c in classes):
            raise ValueError(f"classes must be distinct ints in 0..{self.num_classes - 1}, got {classes}")
        new_label = torch.full((self.num_classes,), -1, dtype=torch.int64)
        new_label[classes] = torch.arange(len(classes))
        keep = torch.nonzero(new_label[self.labels] >= 0).squeeze(1)
        base = self.indices if self.indices is not None else torch.arange(len(self))
        return replace(self, images=self.images[keep], labels=new_label[self.labels[keep]],
                       classes=[self.classes[c] for c in classes], indices=base[keep])


def load_dataset(name: str, train: bool = True, root: str | os.PathLike | None = None,
                 download: bool | None = None) -> ImageDataset:
    """Load one split of ``name`` (``fashion-mnist``, ``mnist`` or ``cifar10``) through torchvision.

    download: try torchvision's download when the files are missing (default: True unless
        ``$EFFICIENTML_DOWNLOAD=0``). Offline, or with ``download=False``, missing files raise
        ``DataMissingError`` saying which folder was searched and how to get the files.
    """
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    spec = DATASETS[key]
    folder = data_root(root)
    if download is None:
        download = os.environ.get("EFFICIENTML_DOWNLOAD", "1") != "0"
    try:
        ds = spec.tv_class(str(folder), train=train, download=False)
    except RuntimeError:
        ds = None
        if download:
            try:
                ds = spec.tv_class(str(folder), train=train, download=True)
            except Exception:  # no network, a refused mirror, a full disk: all mean "not here"
                ds = None
        if ds is None:
            raise DataMissingError(
                f"{key}: the {'training' if train else 'test'} files were not found under "
                f"{folder / spec.folder} and could not be downloaded. Put torchvision's files for "
                f"{spec.tv_class.__name__} there (with internet, load_dataset({key!r}) downloads "
                f"them), or point EFFICIENTML_DATA (or root=) at a folder that has them."
            ) from None
    images = torch.as_tensor(np.asarray(ds.data))
    if images.ndim == 3:                     # MNIST-style (N, H, W) -> (N, 1, H, W)
        images = images.unsqueeze(1)
    else:                                    # CIFAR-style (N, H, W, C) -> (N, C, H, W)
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return ImageDataset(key, train, images.contiguous(), labels, list(ds.classes),
                        spec.mean, spec.std, spec.crop_padding, spec.hflip)


class TensorLoader:
    """Batches of a tensor-resident ``ImageDataset``, made on ``device``.

    Each iteration yields ``(x, y)``: ``x`` float32 of shape (B, C, H, W), normalised with the
    data set's mean and std; ``y`` int64 of shape (B,). With ``augment=True``, each image is
    padded with ``crop_padding`` zero (black) pixels on every side, cropped back to H x W at a
    random offset, and mirrored with probability 1/2 when the data set allows it (``hflip``), as
    torchvision's ``RandomCrop(padding=p)`` and ``RandomHorizontalFlip`` do per image.

    Randomness comes from ``seed`` and the epoch (``set_epoch``), so a given epoch gives the
    same batches whenever it runs, which also makes a resumed run equal to an uninterrupted one.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int = 128, shuffle: bool = False,
                 augment: bool = False, drop_last: bool = False, device: str | torch.device = "cpu",
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("cannot batch an empty data set")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.device = torch.device(device)
        self.seed, self.epoch = seed, 0
        self.images = dataset.images.to(self.device)          # uint8, moved once
        self.labels = dataset.labels.to(self.device)
        c = dataset.images.shape[1]
        self.mean = torch.tensor(dataset.mean, device=self.device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(dataset.std, device=self.device).view(1, c, 1, 1) * 255

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration produces."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        g = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].float()
            if self.augment:
                x = self._augment(x, g)
            yield (x - self.mean) / self.std, self.labels[idx]

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding, then a random horizontal flip, on a (B, C, H, W) batch."""
        b, c, h, w = x.shape
        p = self.dataset.crop_padding
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b, 1), generator=g).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b, 1), generator=g).to(x.device)
            rows = (dy + torch.arange(h, device=x.device)).view(b, 1, h, 1)  # (B, 1, H, 1)
            cols = (dx + torch.arange(w, device=x.device)).view(b, 1, 1, w)  # (B, 1, 1, W)
            batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
            chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
            x = padded[batch, chan, rows, cols]                              # (B, C, H, W)
        if self.dataset.hflip:
            flip = (torch.rand(b, generator=g) < 0.5).to(x.device).view(b, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        return x
