"""Pruning: masks that remove whole filters (structured) or single weights (unstructured).

A ``SparseConv2d`` keeps its raw ``weight`` as a parameter and a ``mask`` of zeros and ones as a
buffer; its effective weight is ``mask * weight``. Masked entries are therefore exactly zero in
every forward pass, and autograd gives their raw weights zero gradient (d(mask * w)/dw = mask), so
training cannot bring them back. The optimizer still moves a masked RAW weight: SGD's weight decay
shrinks it and its momentum buffer, filled before it was pruned, keeps pushing it; but its value
is never used (the effective weight ``mask * weight`` stays exactly 0, and pruning ranks pruned
entries first whatever their raw value). Pruning only ever sets mask entries to 0, so what was
pruned stays pruned.

Importance is magnitude: the L1 norm (sum of ABSOLUTE weights) of a filter for structured
pruning, |w| for unstructured pruning, as in ``torch.nn.utils.prune.ln_structured(n=1, dim=0)``
and ``l1_unstructured``.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .models import ConvNet
from .train import evaluate

GRANULARITIES = ("filter", "weight")


class SparseConv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` whose effective weight is ``mask * weight``.

    granularity ``"filter"``: mask of shape (out_channels, 1, 1, 1), one entry per output filter
    (structured); ``"weight"``: mask of the weight's shape (out, in/groups, kh, kw) (unstructured).
    """

    def __init__(self, *args, granularity: str = "filter", **kwargs):
        super().__init__(*args, **kwargs)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        shape = (self.out_channels, 1, 1, 1) if granularity == "filter" else tuple(self.weight.shape)
        self.register_buffer("mask", torch.ones(shape, dtype=self.weight.dtype, device=self.weight.device))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, granularity: str = "filter") -> "SparseConv2d":
        """A SparseConv2d with ``conv``'s configuration and (copied) weights, nothing masked."""
        with torch.random.fork_rng(devices=[]):  # its throw-away initialisation must not move the global RNG
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                      granularity=granularity, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        return new

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x):
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def sparsity(self) -> float:
        """Fraction of mask entries that are 0: pruned filters, or pruned weights."""
        return 1.0 - self.mask.mean().item()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", granularity={self.granularity}"


class SparseConvNet(ConvNet):
    """``ConvNet`` with every convolution a ``SparseConv2d`` of one granularity.

    With nothing pruned it computes exactly what ``ConvNet`` computes (the same parameters are
    created in the same order, so the same seed gives the same initial weights). With structured
    pruning, a pruned filter's whole channel is silenced: the filter mask also multiplies the
    BatchNorm output, because BatchNorm would otherwise turn the zero filter into the constant
    beta - gamma * mean / std and keep feeding it to the next layer. The pruned channel then
    contributes nothing, and ``compact`` can remove it physically without changing the outputs.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 granularity: str = "filter"):
        super().__init__(in_channels, num_classes, width)
        for block in self.features:
            block[0] = SparseConv2d.from_conv(block[0], granularity)

    def forward(self, x):
        for conv, bn, relu in self.features:
            x = bn(conv(x))
            if conv.granularity == "filter":
                x = x * conv.mask.view(1, -1, 1, 1)
            x = relu(x)
        return self.classifier(self.pool(x).flatten(1))


def sparse_layers(net: nn.Module) -> dict[str, SparseConv2d]:
    """Every SparseConv2d of ``net``, by name."""
    return {name: m for name, m in net.named_modules() if isinstance(m, SparseConv2d)}


def _check_percent(prune_percent) -> float:
    if isinstance(prune_percent, bool) or not isinstance(prune_percent, numbers.Real):
        raise TypeError(f"prune_percent must be a number in [0, 1], got {type(prune_percent).__name__}")
    if not 0.0 <= prune_percent <= 1.0 or math.isnan(prune_percent):
        raise ValueError(f"prune_percent is a fraction in [0, 1] (0.3 prunes 30%), got {prune_percent}")
    return float(prune_percent)


def _prune_smallest(mask: torch.Tensor, scores: torch.Tensor, n_pruned: int) -> None:
    """Zero ``mask`` where ``scores`` are smallest until ``n_pruned`` entries are zero; pruned entries
    count first (score -inf), so they stay pruned and the rest are ranked by importance."""
    flat_mask = mask.view(-1)
    scores = torch.where(flat_mask == 0, -math.inf, scores.reshape(-1).to(torch.float64))
    if n_pruned > 0:
        flat_mask[torch.topk(scores, n_pruned, largest=False).indices] = 0


@torch.no_grad()
def filter_l1_pruning(net: nn.Module, prune_percent: float) -> dict[str, float]:
    """Structured pruning: in every filter-granularity SparseConv2d of ``net``, mask the filters with
    the smallest L1 norm (sum of |w| over the filter) until ``prune_percent`` of the layer's filters
    are pruned (round(prune_percent * out_channels), as torch.nn.utils.prune counts). Linear layers
    are never pruned. Returns each layer's fraction of pruned filters."""
    p = _check_percent(prune_percent)
    layers = {n: m for n, m in sparse_layers(net).items() if m.granularity == "filter"}
    if not layers:
        raise ValueError("the network has no filter-granularity SparseConv2d layers to prune")
    for m in layers.values():
        l1 = m.effective_weight().abs().sum(dim=(1, 2, 3))
        _prune_smallest(m.mask, l1, round(p * m.out_channels))
    return {n: m.sparsity() for n, m in layers.items()}


@torch.no_grad()
def unstructured_pruning(net: nn.Module, prune_percent: float) -> dict[str, float]:
    """Unstructured pruning: in every weight-granularity SparseConv2d of ``net``, mask the
    smallest-magnitude weights until ``prune_percent`` of the layer's weights are pruned
    (round(prune_percent * numel)). Returns each layer's fraction of pruned weights."""
    p = _check_percent(prune_percent)
    layers = {n: m for n, m in sparse_layers(net).items() if m.granularity == "weight"}
    if not layers:
        raise ValueError("the network has no weight-granularity SparseConv2d layers to prune")
    for m in layers.values():
        _prune_smallest(m.mask, m.effective_weight().abs(), round(p * m.weight.numel()))
    return {n: m.sparsity() for n, m in layers.items()}


class PruningSchedule:
    """A ``fit`` callback: after epochs ``start``, ``start + every``, ... up to ``stop``, prune a
    further ``step`` of each layer (cumulative targets step, 2 step, ...).

    The assignment's schedule is start=10, every=10, stop=50, step=0.1: 10% after epoch 10, ...,
    50% after epoch 50. ``log`` records (epoch, {layer: sparsity}) at each pruning.

    ``fit`` evaluates the model before calling back, so its ``test_acc`` of a pruning epoch is the
    accuracy *before* that pruning. With ``evaluate_on`` (a test loader) the schedule also
    evaluates right *after* each pruning, before any retraining, and appends that accuracy to
    ``acc_after`` (one entry per ``log`` entry). Evaluation changes nothing in training.
    """

    def __init__(self, kind: str, start: int, every: int, stop: int, step: float = 0.1,
                 evaluate_on=None):
        if kind not in ("structured", "unstructured"):
            raise ValueError(f"kind must be 'structured' or 'unstructured', got {kind!r}")
        if not 1 <= start <= stop or every < 1:
            raise ValueError(f"need 1 <= start <= stop and every >= 1, got {start}, {stop}, {every}")
        self.prune = filter_l1_pruning if kind == "structured" else unstructured_pruning
        self.kind, self.start, self.every, self.stop, self.step = kind, start, every, stop, step
        self.log: list[tuple[int, dict[str, float]]] = []
        self.evaluate_on = evaluate_on
        self.acc_after: list[float] = []

    @property
    def epochs(self) -> list[int]:
        """The epochs after which pruning happens."""
        return list(range(self.start, self.stop + 1, self.every))

    def target(self, epoch: int) -> float:
        """The fraction pruned once ``epoch`` is done."""
        done = sum(1 for e in self.epochs if e <= epoch)
        return min(1.0, round(done * self.step, 10))

    def __call__(self, epoch: int, model: nn.Module, history) -> None:
        if epoch in self.epochs:
            self.log.append((epoch, self.prune(model, self.target(epoch))))
            if self.evaluate_on is not None:
                self.acc_after.append(evaluate(model, self.evaluate_on)[1])


@torch.no_grad()
def compact(net: SparseConvNet) -> ConvNet:
    """The physically smaller dense ``ConvNet`` of a structurally pruned ``SparseConvNet``: pruned
    filters removed, with their BatchNorm entries, the next layer's input channels and the
    classifier's input features. In eval mode it computes the same outputs as ``net``."""
    keep = []
    for conv, _, _ in net.features:
        if conv.granularity != "filter":
            raise ValueError("compact needs filter-granularity (structured) pruning")
        kept = torch.nonzero(conv.mask.view(-1)).view(-1)
        if len(kept) == 0:
            raise ValueError("a layer has every filter pruned: nothing would flow through it")
        keep.append(kept)
    first = net.features[0][0]
    small = ConvNet(first.in_channels, net.classifier.out_features,
                    channels=[len(k) for k in keep]).to(first.weight.device)
    prev = torch.arange(first.in_channels, device=first.weight.device)
    for (conv, bn, _), (new_conv, new_bn, _), kept in zip(net.features, small.features, keep):
        new_conv.weight.copy_(conv.effective_weight()[kept][:, prev])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, name).copy_(getattr(bn, name)[kept])
        new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        prev = kept
    small.classifier.weight.copy_(net.classifier.weight[:, prev])
    small.classifier.bias.copy_(net.classifier.bias)
    return small.eval()


def conv_as_matmul(conv: SparseConv2d, layout=torch.sparse_csr):
    """A function computing ``conv`` (no bias) as a matrix product over unfolded (im2col) patches:
    the masked weight as an (out, in*kh*kw) matrix, stored sparse (``layout``, e.g. CSR) or dense
    (``layout=None``), times the patches. Used to measure when unstructured sparsity pays off."""
    w = conv.effective_weight().detach().reshape(conv.out_channels, -1)
    if layout is not None:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            w = w.to_sparse(layout=layout)
    k, s, p = conv.kernel_size, conv.stride, conv.padding

    def forward(x):
        b, _, h, wd = x.shape
        cols = F.unfold(x, k, padding=p, stride=s)                    # (B, in*kh*kw, L)
        out = w @ cols.transpose(0, 1).reshape(cols.shape[1], -1)    # (out, B*L)
        ho = (h + 2 * p[0] - k[0]) // s[0] + 1
        return out.reshape(conv.out_channels, b, ho, -1).transpose(0, 1)
    return forward
