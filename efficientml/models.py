"""Models shared by several chapters."""
from __future__ import annotations

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
