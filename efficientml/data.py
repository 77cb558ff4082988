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

    def subset(self, n_per_class: int, seed: int = 0, skip: int = 0) -> "ImageDataset":
        """A class-balanced subset: ``n_per_class`` examples of every class, chosen by ``seed``.

        The same (n_per_class, seed) always gives the same examples, in a class-interleaved order.
        Each class's examples are shuffled by ``seed`` and the subset takes them from position
        ``skip`` on, so ``subset(m, seed, skip=n)`` shares no example with ``subset(n, seed)``: a
        held-out validation split beside a training subset.
        """
        if not isinstance(n_per_class, int) or n_per_class < 1:
            raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
        if not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be an int >= 0, got {skip!r}")
        counts = self.class_counts()
        if int(counts.min()) < skip + n_per_class:
            raise ValueError(f"{self.name} has only {int(counts.min())} examples of its rarest class; "
                             f"cannot take {n_per_class} per class"
                             + (f" after skipping {skip}" if skip else ""))
        g = torch.Generator().manual_seed(seed)
        picks = []
        for c in range(self.num_classes):
            rows = torch.nonzero(self.labels == c).squeeze(1)
            picks.append(rows[torch.randperm(len(rows), generator=g)[skip:skip + n_per_class]])
        rows = torch.stack(picks, dim=1).reshape(-1)  # interleave classes: c0, c1, ..., c0, c1, ...
        return self._rows(rows)

    def without(self, other: "ImageDataset") -> "ImageDataset":
        """The examples of this data set that ``other`` (a subset of the same split, e.g. a
        validation split) does not hold, in their order here."""
        if (other.name, other.train) != (self.name, self.train):
            raise ValueError(f"{other.name} ({'train' if other.train else 'test'}) is not a subset "
                             f"of {self.name} ({'train' if self.train else 'test'})")
        keep = torch.nonzero(~torch.isin(self._base(), other._base())).squeeze(1)
        return self._rows(keep)

    def _base(self) -> torch.Tensor:
        """Each example's row in the full split."""
        return self.indices if self.indices is not None else torch.arange(len(self))

    def _rows(self, rows: torch.Tensor) -> "ImageDataset":
        return replace(self, images=self.images[rows], labels=self.labels[rows], indices=self._base()[rows])


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
        return replace(self, images=self.images[keep], labels=new_label[self.labels[keep]],
                       classes=[self.classes[c] for c in classes], indices=self._base()[keep])


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


# -- Sequences: a synthetic task for Chapter 5, Tiny Shakespeare for Chapter 6 ----------------

class SequenceTask:
    """Batches of a synthetic sequence-to-sequence task: ``copy`` or ``reverse`` a random sequence.

    Tokens: 0 = padding, 1 = start (BOS), 2 = end (EOS), 3..3+n_symbols-1 = symbols. Each source
    has a length drawn uniformly from ``min_length..length`` (default: always ``length``) and is
    padded to ``length`` with PAD. Each batch is ``((src, tgt_in), tgt_out)``: src (B, length);
    tgt_in (B, length + 1) = BOS, the answer, then PAD; tgt_out (B, length + 1) = the answer, EOS,
    then ``IGNORE`` (-100, which ``F.cross_entropy`` ignores by default), so that tgt_out is
    tgt_in shifted by one wherever it counts. ``steps`` batches per epoch, drawn from ``seed`` and
    the epoch (``set_epoch``), so they repeat exactly.
    """
    PAD, BOS, EOS = 0, 1, 2
    IGNORE = -100  # target positions after EOS: no loss, no accuracy

    def __init__(self, task: str = "reverse", n_symbols: int = 10, length: int = 8, batch_size: int = 64,
                 steps: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                 min_length: int | None = None):
        if task not in ("copy", "reverse"):
            raise ValueError(f"task must be 'copy' or 'reverse', got {task!r}")
        if n_symbols < 2 or length < 1 or batch_size < 1 or steps < 1:
            raise ValueError("need n_symbols >= 2 and length, batch_size, steps >= 1")
        min_length = length if min_length is None else min_length
        if not 1 <= min_length <= length:
            raise ValueError(f"need 1 <= min_length <= length, got min_length={min_length}, length={length}")
        self.task, self.n_symbols, self.length, self.min_length = task, n_symbols, length, min_length
        self.batch_size, self.steps, self.seed, self.epoch = batch_size, steps, seed, 0
        self.device = torch.device(device)

    @property
    def vocab_size(self) -> int:
        return 3 + self.n_symbols

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def lengths(self, src: torch.Tensor) -> torch.Tensor:
        """(B,) the number of symbols (non-PAD tokens) of each source (B, length)."""
        return (src != self.PAD).sum(1)

    def answer(self, src: torch.Tensor) -> torch.Tensor:
        """The correct output symbols for sources (B, length), PAD after them: a ``reverse``
        answer reverses each source's symbols, not its padding."""
        if self.task == "copy":
            return src
        j = torch.arange(src.shape[1], device=src.device)
        n = self.lengths(src)[:, None]
        ans = src.gather(1, (n - 1 - j).clamp(min=0))
        return ans.masked_fill(j >= n, self.PAD)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        j = torch.arange(self.length + 1)
        for _ in range(self.steps):
            src = torch.randint(3, 3 + self.n_symbols, (self.batch_size, self.length), generator=g)
            n = torch.full((self.batch_size, 1), self.length)
            if self.min_length < self.length:
                n = torch.randint(self.min_length, self.length + 1, (self.batch_size, 1), generator=g)
                src = src.masked_fill(j[:-1] >= n, self.PAD)
            ans = self.answer(src)
            tgt_in = torch.cat([torch.full((self.batch_size, 1), self.BOS), ans], 1)
            tgt_out = torch.cat([ans, torch.full((self.batch_size, 1), self.PAD)], 1)
            tgt_out = tgt_out.masked_fill(j == n, self.EOS).masked_fill(j > n, self.IGNORE)
            yield (src.to(self.device), tgt_in.to(self.device)), tgt_out.to(self.device)


TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def load_text(name: str = "tinyshakespeare", root: str | os.PathLike | None = None,
              download: bool | None = None) -> str:
    """The text of Tiny Shakespeare (1,115,394 characters) from ``ROOT/tinyshakespeare/input.txt``.

    Downloaded from the char-rnn repository when missing and downloads are allowed (as for
    ``load_dataset``); otherwise a ``DataMissingError`` says where the file goes.
    """
    if name != "tinyshakespeare":
        raise ValueError(f"unknown text {name!r}: only 'tinyshakespeare'")
    path = data_root(root) / "tinyshakespeare" / "input.txt"
    if not path.exists():
        if download is None:
            download = os.environ.get("EFFICIENTML_DOWNLOAD", "1") != "0"
        if download:
            try:
                import urllib.request
                path.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as r:
                    path.write_bytes(r.read())
            except Exception:
                pass
        if not path.exists():
            raise DataMissingError(f"tinyshakespeare: {path} was not found and could not be downloaded. Put "
                                   f"{TINY_SHAKESPEARE_URL} there, or point EFFICIENTML_DATA (or root=) at a "
                                   f"folder that has tinyshakespeare/input.txt.")
    return path.read_text(encoding="utf-8")


class CharTokenizer:
    """Characters <-> token ids, over the sorted set of characters of a text (65 for Tiny Shakespeare)."""

    def __init__(self, text: str):
        if not isinstance(text, str) or not text:
            raise ValueError("need a non-empty text to build a vocabulary from")
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 tensor (len(text),); characters outside the vocabulary raise ValueError."""
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.int64)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split_tokens(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation): the first 1 - val_fraction of the tokens, and the rest (no shuffling,
    so the split is the same every time and no passage is in both)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = int(len(tokens) * (1 - val_fraction))
    return tokens[:n], tokens[n:]


class TokenBatches:
    """Random windows of a token sequence for next-token prediction.

    Each batch is (x, y), both int64 (batch_size, block_size): x = tokens[i:i+block], y =
    tokens[i+1:i+block+1] at random offsets i. ``steps`` batches per epoch; offsets come from
    ``seed`` and the epoch (``set_epoch``), so an epoch always gives the same batches.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, steps: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise TypeError(f"tokens must be a 1-D int64 tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        if len(tokens) <= block_size:
            raise ValueError(f"need more than block_size={block_size} tokens, got {len(tokens)}")
        self.device = torch.device(device)
        self.tokens = tokens.to(self.device)
        self.block_size, self.batch_size, self.steps, self.seed, self.epoch = block_size, batch_size, steps, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        offsets = torch.arange(self.block_size + 1, device=self.device)
        for _ in range(self.steps):
            i = torch.randint(0, len(self.tokens) - self.block_size, (self.batch_size, 1), generator=g)
            window = self.tokens[i.to(self.device) + offsets]          # (B, block + 1)
            yield window[:, :-1], window[:, 1:]
