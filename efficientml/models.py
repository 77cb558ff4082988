"""Models shared by several chapters."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn


class MLP(nn.Module):
    """A multilayer perceptron classifier for small images.

    Input (B, C, H, W) is flattened to (B, in_features); ``hidden`` lists the widths of the
    hidden Linear-ReLU layers; output (B, num_classes) logits.
    """

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 128), num_classes: int = 10):
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer widths must be >= 1: in_features={in_features}, hidden={hidden}, "
                             f"num_classes={num_classes}")
        widths = (in_features, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class ConvNet(nn.Module):
    """The assignment's ConvNet: nine conv(3x3)-BatchNorm-ReLU blocks, global average pooling, one Linear.

    Channels 32, 32, 64, 64, 64, 128, 128, 256, 256 (times ``width``, or as given in ``channels``,
    which is how a structurally pruned net is rebuilt smaller); the third and sixth blocks
    have stride 2, so the net downsamples by stride, not by pooling. At ``width=1`` on
    3x32x32 CIFAR-10 images it has about 1.2M parameters and 105M multiply-accumulates per image.
    Input (B, in_channels, H, W); output (B, num_classes) logits.
    """
    CHANNELS = (32, 32, 64, 64, 64, 128, 128, 256, 256)
    STRIDES = (1, 1, 2, 1, 1, 2, 1, 1, 1)

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 channels: list[int] | None = None):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or not width > 0:
            raise ValueError(f"need in_channels >= 1, num_classes >= 1, width > 0; got "
                             f"{in_channels}, {num_classes}, {width}")
        if channels is None:
            channels = [max(1, round(c * width)) for c in self.CHANNELS]
        elif len(channels) != len(self.CHANNELS) or min(channels) < 1:
            raise ValueError(f"channels must be {len(self.CHANNELS)} positive ints, got {channels}")
        blocks, c_in = [], in_channels
        for c_out, stride in zip(channels, self.STRIDES):
            blocks.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                                        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of ONE example of shape ``input_shape`` (C, H, W).

    Counts the convolutions (out elements x in_channels/groups x kernel area) and linear layers
    (out features x in features), where nearly all the work is; BatchNorm, ReLU, pooling and
    biases are left out, as is usual.
    """
    macs = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1]
        macs += out[0].numel() * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal macs
        macs += out[0].numel() * m.in_features

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


class WeightsMissingError(FileNotFoundError):
    """Pretrained weights are not in torch's hub cache and could not be downloaded."""


def resnet18(num_classes: int = 1000, in_channels: int = 3, weights: str | None = None, width: int = 64,
             small_input: bool = False) -> nn.Module:
    """torchvision's ResNet-18, optionally with its ImageNet weights, adapted to the task.

    weights: ``None`` (random initialisation) or ``"IMAGENET1K_V1"``, loaded through torchvision's
        weights API: from ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth`` if it is there,
        else downloaded (unless ``$EFFICIENTML_DOWNLOAD=0``); offline and missing, a
        ``WeightsMissingError`` says where the file goes.
    in_channels: 3 for colour images; 1 for grey ones, where the pretrained RGB kernels of the
        first convolution are summed over colour, which is exact for a grey image seen as R=G=B.
    num_classes: with ImageNet weights and num_classes != 1000, the classifier ``fc`` is replaced
        by a new, randomly initialised ``nn.Linear(512, num_classes)``.
    width: channels of the first stage (torchvision's 64); the stages have width, 2 width,
        4 width and 8 width channels, built by torchvision's own ``ResNet._make_layer`` and
        initialised as torchvision initialises them. Only 64 with ``weights``.
    small_input: the stem of ResNets for small images (He et al. 2016, section 4.2, on CIFAR-10):
        a 3x3 stride-1 ``conv1`` and no max pooling (``maxpool`` is an ``nn.Identity``), so the
        stages see maps of 4 times the side: on 28x28 images layer1-layer4 see 28, 14, 7 and 4 pixels
        a side, where the ImageNet stem (7x7 stride 2, then max pooling) leaves 7, 4, 2 and 1.
        Only without ``weights``.
    Input (B, in_channels, H, W): the ImageNet stem downsamples by 32 in all (the small one by 8)
    and the net ends in adaptive average pooling, so 28x28 Fashion-MNIST images work; output
    (B, num_classes). Module names are torchvision's (conv1, bn1, layer1-4, fc) either way.
    """
    if num_classes < 1 or in_channels not in (1, 3) or width < 1:
        raise ValueError(f"need num_classes >= 1, in_channels 1 or 3 and width >= 1, got {num_classes}, "
                         f"{in_channels}, {width}")
    if weights is not None and (width != 64 or small_input):
        raise ValueError(f"ImageNet weights exist for width 64 and the ImageNet stem only, got width={width}, "
                         f"small_input={small_input}")
    if weights is None:
        model = torchvision.models.resnet18(num_classes=num_classes)
        if width != 64 or small_input:
            _resize_resnet(model, num_classes, width, small_input)
    else:
        w = torchvision.models.ResNet18_Weights[weights] if isinstance(weights, str) else weights
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        if not file.exists() and os.environ.get("EFFICIENTML_DOWNLOAD", "1") == "0":
            raise WeightsMissingError(f"ResNet-18 {w.name} weights are not at {file} and downloads are off "
                                      f"(EFFICIENTML_DOWNLOAD=0); put {w.url} there (TORCH_HOME moves the folder)")
        try:
            model = torchvision.models.resnet18(weights=w)
        except OSError as e:  # urllib's URLError is an OSError: no network
            raise WeightsMissingError(f"ResNet-18 {w.name} weights are not at {file} and could not be "
                                      f"downloaded ({e}); put {w.url} there (TORCH_HOME moves the folder)") from None
        if num_classes != model.fc.out_features:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
    if in_channels == 1:
        rgb = model.conv1
        model.conv1 = nn.Conv2d(1, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding, bias=False)
        with torch.no_grad():
            if weights is None:  # torchvision's own initialisation of ResNet convolutions
                nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            else:
                model.conv1.weight.copy_(rgb.weight.sum(dim=1, keepdim=True))
    return model


def _resize_resnet(model: nn.Module, num_classes: int, width: int, small_input: bool) -> None:
    """Rebuild torchvision ResNet-18 ``model`` in place with stages of width, 2 width, 4 width and
    8 width channels and, if ``small_input``, a 3x3 stride-1 stem without max pooling; new
    layers initialised as torchvision initialises a ResNet (He-normal convolutions, BatchNorm
    gains 1 and shifts 0, PyTorch's default Linear)."""
    block = torchvision.models.resnet.BasicBlock
    kernel, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
    model.conv1 = nn.Conv2d(3, width, kernel, stride, padding, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    if small_input:
        model.maxpool = nn.Identity()
    model.inplanes = width
    model.layer1 = model._make_layer(block, width, 2)
    model.layer2 = model._make_layer(block, 2 * width, 2, stride=2)
    model.layer3 = model._make_layer(block, 4 * width, 2, stride=2)
    model.layer4 = model._make_layer(block, 8 * width, 2, stride=2)
    model.fc = nn.Linear(8 * width, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
