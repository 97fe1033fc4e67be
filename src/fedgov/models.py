"""Plain PyTorch models, chosen by name; the input shape comes from the data."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "count_parameters"]


class LogisticRegression(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int) -> None:
        super().__init__()
        del hidden  # a linear model has no hidden width
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(_numel(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_numel(input_shape), hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two convolutions for small images such as the 8x8 digits.

    GroupNorm rather than BatchNorm: it has no running statistics to average
    across cooperatives, and Opacus supports it.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model.name = 'cnn' needs image input (C, H, W), got shape {input_shape}")
        channels, height, width = input_shape
        width_1, width_2 = max(hidden // 4, 4), max(hidden // 2, 8)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width_1, kernel_size=3, padding=1),
            nn.GroupNorm(min(4, width_1), width_1),
            nn.ReLU(),
            nn.Conv2d(width_1, width_2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width_2 * (height // 2) * (width // 2), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.input_shape)))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
}


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, hidden: int = 64,
                seed: int | None = None) -> nn.Module:
    """Build a model; with a seed, its initial weights are the same on every machine."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if seed is None:
        return MODELS[name](input_shape, num_classes, hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes, hidden)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
