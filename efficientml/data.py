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
        g = torch.Generator(device="cpu").manual_seed(seed)
        picks = []
        for c in range(self.num_classes):
            rows = torch.nonzero(self.labels == c).squeeze(1)
            picks.append(rows[torch.randperm(len(rows), generator=g, device=rows.device)[skip:skip + n_per_class]])
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
        return self.indices if self.indices is not None else torch.arange(len(self), device=self.labels.device)

    def _rows(self, rows: torch.Tensor) -> "ImageDataset":
        return replace(self, images=self.images[rows], labels=self.labels[rows], indices=self._base()[rows])


    def select_classes(self, classes: list[int]) -> "ImageDataset":
        """Only the examples of ``classes`` (original indices), relabelled 0..len(classes)-1 in
        the order given; how Chapter 4 splits Fashion-MNIST into a source and a target task."""
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes) or not all(
                isinstance(c, int) and 0 <= c < self.num_classes for c in classes):
            raise ValueError(f"classes must be distinct ints in 0..{self.num_classes - 1}, got {classes}")
        new_label = torch.full((self.num_classes,), -1, dtype=torch.int64, device=self.labels.device)
        new_label[classes] = torch.arange(len(classes), device=self.labels.device)
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


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class EpochBatches:
    """The base of the package's loaders: an epoch's batches are a function of ``seed`` and the
    epoch, so a given epoch gives the same batches whenever it runs (a resumed run equals an
    uninterrupted one).

    At the start of an epoch a subclass draws all of the epoch's randomness at once, on the CPU,
    from a generator seeded by (seed, epoch) (``draw``); it is moved to ``device`` in one transfer,
    and batch ``i`` is cut from it there (``batch``). ``set_epoch`` chooses the epoch.
    """

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed, self.epoch, self.device = seed, 0, torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration produces."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        """A CPU generator seeded by (seed, epoch)."""
        return torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + self.epoch)

    def draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        """The epoch's random choices as CPU tensors (subclasses)."""
        raise NotImplementedError

    def batch(self, drawn: dict[str, torch.Tensor], i: int):
        """Batch ``i`` of the epoch, made on the device from ``drawn`` (subclasses)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self):
        drawn = {k: v.to(self.device) for k, v in self.draw(self.generator()).items()}
        for i in range(len(self)):
            yield self.batch(drawn, i)


class TensorLoader(EpochBatches):
    """Batches of a tensor-resident ``ImageDataset``, made on ``device``.

    Each iteration yields ``(x, y)``: ``x`` float32 of shape (B, C, H, W), normalised with the
    data set's mean and std; ``y`` int64 of shape (B,). With ``augment=True``, each image is
    padded with ``crop_padding`` zero (black) pixels on every side, cropped back to H x W at a
    random offset, and mirrored with probability 1/2 when the data set allows it (``hflip``), as
    torchvision's ``RandomCrop(padding=p)`` and ``RandomHorizontalFlip`` do per image.

    The images are moved to the device once; an epoch's order, crop offsets and flips are drawn
    at its start (``EpochBatches``) from ``seed`` and the epoch (``set_epoch``).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int = 128, shuffle: bool = False,
                 augment: bool = False, drop_last: bool = False, device: str | torch.device = "cpu",
                 seed: int = 0):
        super().__init__(seed, device)
        self.batch_size = _positive_int(batch_size, "batch_size")
        if len(dataset) == 0:
            raise ValueError("cannot batch an empty data set")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"drop_last with {len(dataset)} examples and batch_size {batch_size} "
                             "gives no batch")
        self.dataset = dataset
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.images = dataset.images.to(self.device)          # uint8, moved once
        self.labels = dataset.labels.to(self.device)
        c = dataset.images.shape[1]
        self.mean = torch.tensor(dataset.mean, device=self.device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(dataset.std, device=self.device).view(1, c, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _sizes(self) -> list[int]:
        n, b = len(self.dataset), self.batch_size
        return [min(b, n - i * b) for i in range(len(self))]

    def draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        """``order`` (N,): the examples' order; with augmentation, ``shift`` (N', 2): each used
        example's crop offset (dy, dx) in 0..2p, and ``flip`` (N',): whether it is mirrored,
        drawn batch by batch (offsets, then flips), in the order the batches use them."""
        n = len(self.dataset)
        cpu = torch.device("cpu")
        out = {"order": torch.randperm(n, generator=g, device=cpu) if self.shuffle else torch.arange(n, device=cpu)}
        if not self.augment:
            return out
        p, shifts, flips = self.dataset.crop_padding, [], []
        for b in self._sizes():
            if p > 0:
                dy = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=cpu)
                dx = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=cpu)
                shifts.append(torch.cat([dy, dx], 1))
            if self.dataset.hflip:
                flips.append(torch.rand(b, generator=g, device=cpu) < 0.5)
        if shifts:
            out["shift"] = torch.cat(shifts)
        if flips:
            out["flip"] = torch.cat(flips)
        return out

    def batch(self, drawn: dict[str, torch.Tensor], i: int):
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        idx = drawn["order"][rows]
        x = self.images[idx].float()
        if "shift" in drawn:
            x = self._crop(x, drawn["shift"][rows])
        if "flip" in drawn:
            x = torch.where(drawn["flip"][rows].view(-1, 1, 1, 1), x.flip(3), x)
        return (x - self.mean) / self.std, self.labels[idx]

    def _crop(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Zero-pad a (B, C, H, W) batch by ``crop_padding`` and crop each image back to H x W at
        its offset ``shift`` (B, 2) = (dy, dx)."""
        b, c, h, w = x.shape
        p = self.dataset.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (shift[:, :1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)  # (B, 1, H, 1)
        cols = (shift[:, 1:] + torch.arange(w, device=x.device)).view(b, 1, 1, w)  # (B, 1, 1, W)
        batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[batch, chan, rows, cols]                                    # (B, C, H, W)


# -- Sequences: a synthetic task for Chapter 5, Tiny Shakespeare for Chapter 6 ----------------

class SequenceTask(EpochBatches):
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
        super().__init__(seed, device)
        if task not in ("copy", "reverse"):
            raise ValueError(f"task must be 'copy' or 'reverse', got {task!r}")
        if not isinstance(n_symbols, int) or n_symbols < 2:
            raise ValueError(f"n_symbols must be an int >= 2, got {n_symbols!r}")
        self.length = _positive_int(length, "length")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.steps = _positive_int(steps, "steps")
        min_length = length if min_length is None else min_length
        if not isinstance(min_length, int) or not 1 <= min_length <= length:
            raise ValueError(f"need 1 <= min_length <= length, got min_length={min_length}, length={length}")
        self.task, self.n_symbols, self.min_length = task, n_symbols, min_length

    @property
    def vocab_size(self) -> int:
        return 3 + self.n_symbols

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

    def draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        """``symbols`` (steps, B, length) and ``n`` (steps, B, 1), each source's length, drawn step
        by step (symbols, then lengths)."""
        symbols, lengths, b, cpu = [], [], self.batch_size, torch.device("cpu")
        for _ in range(self.steps):
            symbols.append(torch.randint(3, 3 + self.n_symbols, (b, self.length), generator=g, device=cpu))
            lengths.append(torch.randint(self.min_length, self.length + 1, (b, 1), generator=g, device=cpu)
                           if self.min_length < self.length else torch.full((b, 1), self.length, device=cpu))
        return {"symbols": torch.stack(symbols), "n": torch.stack(lengths)}

    def batch(self, drawn: dict[str, torch.Tensor], i: int):
        n = drawn["n"][i]                                                        # (B, 1)
        j = torch.arange(self.length + 1, device=n.device)
        src = drawn["symbols"][i].masked_fill(j[:-1] >= n, self.PAD)
        ans = self.answer(src)
        tgt_in = torch.cat([torch.full_like(n, self.BOS), ans], 1)
        tgt_out = torch.cat([ans, torch.full_like(n, self.PAD)], 1)
        tgt_out = tgt_out.masked_fill(j == n, self.EOS).masked_fill(j > n, self.IGNORE)
        return (src, tgt_in), tgt_out


TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"


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
            _download(TINY_SHAKESPEARE_URL, path, TINY_SHAKESPEARE_MD5)
        if not path.exists():
            raise DataMissingError(f"tinyshakespeare: {path} was not found and could not be downloaded. Put "
                                   f"{TINY_SHAKESPEARE_URL} there, or point EFFICIENTML_DATA (or root=) at a "
                                   f"folder that has tinyshakespeare/input.txt.")
    return path.read_text(encoding="utf-8")


def _download(url: str, path: Path, md5: str) -> bool:
    """Fetch ``url`` into ``path`` atomically (a temporary file, renamed when complete and its MD5
    checked), so an interrupted or damaged download leaves nothing a later call would read as
    the file; False on failure."""
    import hashlib
    import tempfile
    import urllib.request
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except Exception:  # no network, a refused mirror, a read-only folder: all mean "not here"
        return False
    if hashlib.md5(data).hexdigest() != md5:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


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
        """int64 CPU tensor (len(text),) (loaders move it to their device); characters outside the
        vocabulary raise ValueError."""
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.int64, device="cpu")
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


class TokenBatches(EpochBatches):
    """Random windows of a token sequence for next-token prediction.

    Each batch is (x, y), both int64 (batch_size, block_size): x = tokens[i:i+block], y =
    tokens[i+1:i+block+1] at random offsets i. ``steps`` batches per epoch; offsets come from
    ``seed`` and the epoch (``set_epoch``), so an epoch always gives the same batches.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, steps: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        super().__init__(seed, device)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise TypeError(f"tokens must be a 1-D int64 tensor, got {getattr(tokens, 'dtype', type(tokens))} "
                            f"{tuple(getattr(tokens, 'shape', ()))}")
        self.block_size = _positive_int(block_size, "block_size")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.steps = _positive_int(steps, "steps")
        if len(tokens) <= block_size:
            raise ValueError(f"need more than block_size={block_size} tokens, got {len(tokens)}")
        self.tokens = tokens.to(self.device)

    def __len__(self) -> int:
        return self.steps

    def draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        """``start`` (steps, B, 1): each window's first position."""
        hi = len(self.tokens) - self.block_size
        return {"start": torch.randint(0, hi, (self.steps, self.batch_size, 1), generator=g, device="cpu")}

    def batch(self, drawn: dict[str, torch.Tensor], i: int):
        offsets = torch.arange(self.block_size + 1, device=self.tokens.device)
        window = self.tokens[drawn["start"][i] + offsets]                       # (B, block + 1)
        return window[:, :-1], window[:, 1:]
