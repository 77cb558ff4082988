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
and ``l1_unstructured``. N:M (semi-structured) pruning keeps the n largest |w| of every m
consecutive weights, the pattern (2:4) that NVIDIA's Ampere and later sparse tensor cores run at
twice the dense throughput.

Pruning functions take one fraction for every layer or a dict {layer name: fraction} (per-layer
sparsities, e.g. from ``choose_sparsities`` after a ``sensitivity_scan``).
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Mapping

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
                 granularity: str = "filter", channels: list[int] | None = None):
        super().__init__(in_channels, num_classes, width, channels)
        for block in self.features:
            block[0] = SparseConv2d.from_conv(block[0], granularity)

    @classmethod
    def from_convnet(cls, convnet: ConvNet, granularity: str = "filter") -> "SparseConvNet":
        """A SparseConvNet with ``convnet``'s channels and a copy of its weights, BatchNorm
        statistics and classifier, nothing masked: it computes exactly what ``convnet`` computes
        (train/eval mode, device and dtype as ``convnet``'s). This is how a trained dense network
        is pruned after training."""
        if not isinstance(convnet, ConvNet) or isinstance(convnet, SparseConvNet):
            raise TypeError(f"from_convnet needs a dense ConvNet, got {type(convnet).__name__} "
                            "(copy.deepcopy a SparseConvNet instead)")
        first = convnet.features[0][0]
        with torch.random.fork_rng(devices=[]):  # the throw-away initialisation must not move the RNG
            net = cls(first.in_channels, convnet.classifier.out_features, granularity=granularity,
                      channels=[block[0].out_channels for block in convnet.features])
        missing, unexpected = net.load_state_dict(convnet.state_dict(), strict=False)
        if unexpected or any(not k.endswith(".mask") for k in missing):
            raise ValueError(f"not a ConvNet's state: missing {missing}, unexpected {unexpected}")
        return net.to(first.weight.device, first.weight.dtype).train(convnet.training)

    def forward(self, x):
        for conv, bn, relu in self.features:
            x = bn(conv(x))
            if conv.granularity == "filter":
                x = x * conv.mask.reshape(1, -1, 1, 1)
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


def _ranking_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores`` as float64 on the CPU, -inf where ``mask`` (as many entries, any shape) is 0, in
    ``scores``' shape. Pruning ranks these on the CPU: float64 (exact for any float32 score) is
    not on every device (MPS has none), and the CPU's ``topk`` breaks ties between equal scores
    the same way wherever the weights live."""
    pruned = mask.detach().cpu().reshape(scores.shape) == 0
    return torch.where(pruned, -math.inf, scores.detach().cpu().to(torch.float64))


def _prune_smallest(mask: torch.Tensor, scores: torch.Tensor, n_pruned: int) -> None:
    """Zero ``mask`` where ``scores`` are smallest until ``n_pruned`` entries are zero; pruned entries
    count first (score -inf), so they stay pruned and the rest are ranked by importance."""
    flat_mask = mask.detach().reshape(-1).clone()  # logical order, whatever the memory format
    scores = _ranking_scores(scores.reshape(-1), flat_mask)
    if n_pruned > 0:
        flat_mask[torch.topk(scores, n_pruned, largest=False).indices.to(flat_mask.device)] = 0
    mask.copy_(flat_mask.view(mask.shape))


def _layer_fractions(layers: dict[str, SparseConv2d], prune_percent, granularity: str) -> dict[str, float]:
    """{layer name: fraction} for one fraction for every layer, or a checked dict of some layers."""
    if not layers:
        raise ValueError(f"the network has no {granularity}-granularity SparseConv2d layers to prune")
    if not isinstance(prune_percent, Mapping):
        p = _check_percent(prune_percent)
        return {name: p for name in layers}
    unknown = [name for name in prune_percent if name not in layers]
    if unknown:
        raise ValueError(f"no {granularity}-granularity SparseConv2d named {unknown}; the network's are "
                         f"{list(layers)}")
    return {name: _check_percent(p) for name, p in prune_percent.items()}


@torch.no_grad()
def filter_l1_pruning(net: nn.Module, prune_percent: float | Mapping[str, float]) -> dict[str, float]:
    """Structured pruning: in every filter-granularity SparseConv2d of ``net``, mask the filters with
    the smallest L1 norm (sum of |w| over the filter) until ``prune_percent`` of the layer's filters
    are pruned (round(prune_percent * out_channels), as torch.nn.utils.prune counts). Linear layers
    are never pruned. ``prune_percent`` may be a dict {layer name: fraction}: those layers only,
    each to its own fraction. Returns each layer's fraction of pruned filters."""
    layers = {n: m for n, m in sparse_layers(net).items() if m.granularity == "filter"}
    for name, p in _layer_fractions(layers, prune_percent, "filter").items():
        m = layers[name]
        l1 = m.effective_weight().abs().sum(dim=(1, 2, 3))
        _prune_smallest(m.mask, l1, round(p * m.out_channels))
    return {n: m.sparsity() for n, m in layers.items()}


@torch.no_grad()
def unstructured_pruning(net: nn.Module, prune_percent: float | Mapping[str, float]) -> dict[str, float]:
    """Unstructured pruning: in every weight-granularity SparseConv2d of ``net``, mask the
    smallest-magnitude weights until ``prune_percent`` of the layer's weights are pruned
    (round(prune_percent * numel)). ``prune_percent`` may be a dict {layer name: fraction}: those
    layers only, each to its own fraction. Returns each layer's fraction of pruned weights."""
    layers = {n: m for n, m in sparse_layers(net).items() if m.granularity == "weight"}
    for name, p in _layer_fractions(layers, prune_percent, "weight").items():
        m = layers[name]
        _prune_smallest(m.mask, m.effective_weight().abs(), round(p * m.weight.numel()))
    return {n: m.sparsity() for n, m in layers.items()}


KINDS = {"structured": "filter", "unstructured": "weight"}  # kind of pruning -> SparseConv2d granularity


def pruner(kind: str):
    """The pruning function of ``kind``: ``filter_l1_pruning`` (structured) or
    ``unstructured_pruning``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    return filter_l1_pruning if kind == "structured" else unstructured_pruning


def overall_sparsity(net: nn.Module) -> float:
    """Fraction of all SparseConv2d weights of ``net`` that are masked (a pruned filter counts
    all of its weights): per-layer sparsities weighted by the layers' sizes."""
    layers = sparse_layers(net).values()
    if not layers:
        raise ValueError("the network has no SparseConv2d layers")
    pruned = sum((m.mask.expand_as(m.weight) == 0).sum().item() for m in layers)
    return pruned / sum(m.weight.numel() for m in layers)


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, loader, device=None) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance of ``net`` in place: reset them, then
    one pass over ``loader`` (e.g. the training loader) in training mode without gradients, each
    batch weighted equally (a cumulative average, not the training's moving one). No weight
    changes. Pruning changes what flows into every later BatchNorm, so the statistics measured on
    the unpruned net normalise the pruned one wrongly; this fixes that. Returns ``net``."""
    if device is None:
        device = next(net.parameters()).device
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("the network has no BatchNorm layers to recalibrate")
    was_training, momenta = net.training, [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    try:
        for x, _ in loader:
            net(x.to(device))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        net.train(was_training)
    return net


def _check_n_m(n, m) -> None:
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (n, m)):
        raise TypeError(f"n and m must be ints, got {n!r}, {m!r}")
    if not 1 <= n <= m:
        raise ValueError(f"N:M sparsity keeps n of every m weights, so 1 <= n <= m; got n={n}, m={m}")


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """The N:M mask of importance ``scores`` (out, ...), e.g. |w| of a conv weight (out, in, kh, kw):
    each row flattened along the reduction dimension (in*kh*kw, in PyTorch's order), cut into groups of
    ``m`` consecutive entries, and in each group the ``n`` highest scores kept (1) and the rest
    masked (0). A float mask of ``scores``' shape; ValueError if the row length is not a multiple of m."""
    _check_n_m(n, m)
    if scores.dim() < 2:
        raise ValueError(f"scores need an output dimension and a reduction dimension, got shape "
                         f"{tuple(scores.shape)}")
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(f"{n}:{m} sparsity needs the reduction length (in*kh*kw = {rows.shape[1]}) "
                         f"to be a multiple of m={m}")
    groups = rows.reshape(rows.shape[0], -1, m)                          # (out, in*kh*kw / m, m)
    keep = torch.zeros_like(groups, dtype=torch.float32)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1).indices, 1.0)
    return keep.reshape(scores.shape)


@torch.no_grad()
def n_m_pruning(net: nn.Module, n: int = 2, m: int = 4, skip_indivisible: bool = False) -> dict[str, float]:
    """Semi-structured N:M pruning: in every weight-granularity SparseConv2d of ``net``, keep the ``n``
    largest |w| of every ``m`` consecutive weights along the reduction dimension (``n_m_mask``), so
    every layer ends exactly 1 - n/m sparse (50% for 2:4). Weights pruned before rank lowest and
    stay pruned. A layer whose in*kh*kw is not a multiple of ``m`` (a 3x3 convolution of one input
    channel: 9) raises ValueError, or with ``skip_indivisible`` is left as it is. Returns each
    pruned layer's fraction of pruned weights."""
    _check_n_m(n, m)
    layers = {name: mod for name, mod in sparse_layers(net).items() if mod.granularity == "weight"}
    if not layers:
        raise ValueError("the network has no weight-granularity SparseConv2d layers to prune")
    bad = [name for name, mod in layers.items() if mod.weight[0].numel() % m]
    if bad and not skip_indivisible:  # checked before any layer is pruned
        raise ValueError(f"{n}:{m} sparsity needs in*kh*kw to be a multiple of {m}; it is not in layers "
                         f"{bad} (skip_indivisible=True leaves them dense)")
    layers = {name: mod for name, mod in layers.items() if name not in bad}
    for mod in layers.values():
        scores = _ranking_scores(mod.effective_weight().abs(), mod.mask)
        mod.mask.mul_(n_m_mask(scores, n, m).to(mod.mask.device, mod.mask.dtype))
    return {name: mod.sparsity() for name, mod in layers.items()}


def two_four_pruning(net: nn.Module, skip_indivisible: bool = False) -> dict[str, float]:
    """2:4 sparsity, the pattern of NVIDIA's sparse tensor cores: ``n_m_pruning(net, 2, 4)``."""
    return n_m_pruning(net, 2, 4, skip_indivisible)


def n_m_storage(numel: int, n: int = 2, m: int = 4, dtype: torch.dtype = torch.float16) -> dict:
    """Bytes to store a weight of ``numel`` entries (a multiple of ``m``) of ``dtype`` with N:M
    sparsity, in the compressed format of sparse tensor cores: the numel * n/m kept values, plus for
    each kept value its position in its group of m as a ceil(log2 m)-bit index (2 bits for 2:4).

    2:4 with fp16 values: 2 bytes + 2 bits per kept value, half the values kept, so
    0.5 * (16 + 2) / 16 = 0.5625 of dense fp16; fp32: 0.5 * (32 + 2) / 32 = 0.53125; int8: 0.625.
    Returns {"values", "metadata", "total", "dense"} in bytes and "fraction" = total / dense."""
    _check_n_m(n, m)
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 1 or numel % m:
        raise ValueError(f"numel must be a positive multiple of m={m}, got {numel!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    kept = numel // m * n
    values = kept * dtype.itemsize
    metadata = math.ceil(kept * math.ceil(math.log2(m)) / 8)
    dense = numel * dtype.itemsize
    return {"values": values, "metadata": metadata, "total": values + metadata, "dense": dense,
            "fraction": (values + metadata) / dense}


@torch.no_grad()
def sensitivity_scan(model: nn.Module, test_loader, sparsities, kind: str, calibration_loader=None,
                     device=None) -> dict[str, dict[float, float]]:
    """Per-layer sensitivity: the test accuracy of ``model`` with ONE convolution pruned (``kind``
    "structured" or "unstructured", one-shot, no fine-tuning) to each of ``sparsities``, the others
    left as they are. With ``calibration_loader`` (e.g. the training loader) every pruned copy, and
    the unpruned one, has its BatchNorm statistics re-estimated first (``recalibrate_batchnorm``).
    ``model``, a trained ConvNet (copied with ``SparseConvNet.from_convnet``) or a SparseConvNet of
    the kind's granularity (copied), is not changed. Returns {layer name: {sparsity: accuracy}},
    each layer's dict starting at 0.0: the unpruned accuracy."""
    prune, granularity = pruner(kind), KINDS[kind]
    sparsities = sorted({0.0, *(_check_percent(p) for p in sparsities)})
    if isinstance(model, SparseConvNet):
        if any(m.granularity != granularity for m in sparse_layers(model).values()):
            raise ValueError(f"{kind} pruning needs {granularity}-granularity layers")
        base = copy.deepcopy(model)
    else:
        base = SparseConvNet.from_convnet(model, granularity)

    def accuracy(layer_fraction: dict[str, float]) -> float:
        net = copy.deepcopy(base)
        prune(net, layer_fraction)
        if calibration_loader is not None:
            recalibrate_batchnorm(net, calibration_loader, device)
        return evaluate(net, test_loader, device)[1]

    dense_acc = accuracy({})
    return {name: {0.0: dense_acc, **{p: accuracy({name: p}) for p in sparsities[1:]}}
            for name in sparse_layers(base)}


def choose_sparsities(scan: dict[str, dict[float, float]], max_drop: float) -> dict[str, float]:
    """Per layer of a ``sensitivity_scan``, the highest scanned sparsity whose accuracy is at most
    ``max_drop`` (a fraction: 0.01 is one point) below the unpruned accuracy (the scan's 0.0 entry).
    The drops of layers pruned together add up (roughly), so the whole net loses more than max_drop."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not max_drop >= 0:
        raise ValueError(f"max_drop must be a number >= 0, got {max_drop!r}")
    chosen = {}
    for name, accs in scan.items():
        if 0.0 not in accs:
            raise ValueError(f"layer {name!r} has no unpruned (0.0) accuracy in the scan")
        chosen[name] = max(p for p, acc in accs.items() if accs[0.0] - acc <= max_drop)
    return chosen


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
        self.prune = pruner(kind)
        if not 1 <= start <= stop or every < 1:
            raise ValueError(f"need 1 <= start <= stop and every >= 1, got {start}, {stop}, {every}")
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
        kept = torch.nonzero(conv.mask.reshape(-1)).reshape(-1)
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


@torch.no_grad()
def fold_masks(net: SparseConvNet) -> ConvNet:
    """The dense ``ConvNet`` computing what the unstructurally pruned ``net`` computes: each
    convolution's weight is its effective weight ``mask * weight`` (pruned entries exactly 0),
    everything else copied. Its state dict is what a file of the pruned network must hold (the
    raw weights under the mask are not needed). Structured (filter) pruning also masks
    BatchNorm's output, so it needs ``compact`` instead: ValueError."""
    if not isinstance(net, SparseConvNet):
        raise TypeError(f"fold_masks takes a SparseConvNet, got {type(net).__name__}")
    convs = [conv for conv, _, _ in net.features]
    if any(conv.granularity != "weight" for conv in convs):
        raise ValueError("fold_masks needs weight-granularity (unstructured) pruning; use compact for filters")
    dense = ConvNet(convs[0].in_channels, net.classifier.out_features,
                    channels=[conv.out_channels for conv in convs]).to(convs[0].weight.device)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith(".mask")}
    state |= {f"{name}.weight": m.effective_weight() for name, m in sparse_layers(net).items()}
    dense.load_state_dict(state)
    return dense.train(net.training)
