"""Local training and evaluation in plain PyTorch (no Flower here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TrainResult", "EvalResult", "make_loader", "train", "evaluate", "resolve_device"]


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    steps: int
    train_loss: float  # mean loss over the local epochs


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present; ``cuda`` without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def make_loader(x: np.ndarray, y: np.ndarray, *, batch_size: int, shuffle: bool,
                seed: int = 0) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                            torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train(model: nn.Module, loader: DataLoader, *, epochs: int, lr: float, momentum: float,
          device: torch.device, proximal_mu: float = 0.0,
          optimizer: torch.optim.Optimizer | None = None, criterion: nn.Module | None = None,
          skip_empty_batches: bool = True) -> TrainResult:
    """Local SGD; with ``proximal_mu > 0`` adds FedProx's proximal term towards the received weights."""
    model.to(device)
    model.train()
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    total_loss, total_seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            # Poisson sampling (DP-SGD) can draw empty batches; a private step must still
            # be taken (and counted) for them, a plain one need not.
            if len(yb) == 0 and skip_empty_batches:
                continue
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            objective = loss
            if anchor is not None:
                drift = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
                objective = loss + 0.5 * proximal_mu * drift
            objective.backward()
            optimizer.step()
            total_loss += float(loss.detach().mean()) * len(yb)
            total_seen += len(yb)
            steps += 1
    return TrainResult(num_examples=len(loader.dataset), steps=steps,
                       train_loss=total_loss / max(total_seen, 1))


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, device: torch.device,
             batch_size: int = 1024) -> EvalResult:
    model.to(device)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    # Slices of one tensor: the batches a DataLoader would give, without indexing example by example.
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ys = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    for start in range(0, len(ys), batch_size):
        xb, yb = xs[start:start + batch_size].to(device), ys[start:start + batch_size].to(device)
        logits = model(xb)
        loss += criterion(logits, yb).item()
        correct += (logits.argmax(dim=1) == yb).sum().item()
    n = len(y)
    return EvalResult(num_examples=n, loss=loss / max(n, 1), accuracy=correct / max(n, 1))
