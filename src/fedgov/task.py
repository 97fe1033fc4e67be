"""Local training and evaluation in plain PyTorch (no Flower here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .models import LogisticRegression

__all__ = ["TrainResult", "EvalResult", "make_loader", "train", "evaluate", "pooled_loss", "resolve_device"]


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


def pooled_loss(losses: list[tuple[float, int]]) -> float | None:
    """The loss over the union of several datasets, from each one's (mean loss, examples);
    None when they hold no example (FedProx's training loss is this over every member)."""
    seen = sum(n for _, n in losses)
    return sum(loss * n for loss, n in losses) / seen if seen else None


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
    """Local SGD; with ``proximal_mu > 0`` adds FedProx's proximal term towards the received weights.

    A logistic regression on the CPU with fedgov's own optimizer and loss trains through
    :func:`_train_softmax_regression`: the same steps on the same batches, with the gradient
    written out instead of taken by autograd, about ten times faster per step.
    """
    if (optimizer is None and criterion is None and device.type == "cpu" and isinstance(model, LogisticRegression)
            and isinstance(loader.dataset, TensorDataset)):
        model.to(device)
        model.train()
        return _train_softmax_regression(model, loader, epochs=epochs, lr=lr, momentum=momentum,
                                         proximal_mu=proximal_mu)
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


def _batch_orders(loader: DataLoader, epochs: int):
    """The row order of each epoch, as ``loader`` would draw it from its generator.

    A DataLoader's iterator first draws its base seed from the generator, then its
    RandomSampler draws one permutation to serve and a second for the remainder it never
    serves; drawing the same numbers keeps batches (and so results) identical.
    """
    n = len(loader.dataset)
    generator = loader.generator
    shuffled = generator is not None and isinstance(loader.sampler, torch.utils.data.RandomSampler)
    for _ in range(epochs):
        if not shuffled:
            yield np.arange(n)
            continue
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(n, generator=generator).numpy()
        torch.randperm(n, generator=generator)
        yield order


def _train_softmax_regression(model: "LogisticRegression", loader: DataLoader, *, epochs: int, lr: float,
                              momentum: float, proximal_mu: float) -> TrainResult:
    """``train`` for a logistic regression: SGD with cross-entropy's gradient in closed form.

    Per batch of size m: p = softmax(x W^T + b), the gradient of the mean loss is
    (p - onehot(y))^T x / m for W and its column sums for b; the proximal term adds
    mu (w - w_received); momentum follows torch.optim.SGD (no dampening, not Nesterov).
    float32 throughout, as autograd would compute it, up to rounding.
    """
    x_all, y_all = (t.numpy() for t in loader.dataset.tensors)
    x_all = x_all.reshape(len(x_all), -1)
    linear = model.linear
    weight = linear.weight.detach().numpy().T.copy()  # (d, C), so a batch's logits are x @ weight
    bias = linear.bias.detach().numpy().copy()
    anchor = (weight.copy(), bias.copy()) if proximal_mu > 0 else None
    velocity: tuple[np.ndarray, np.ndarray] | None = None
    lr32, mu32, momentum32 = np.float32(lr), np.float32(proximal_mu), np.float32(momentum)
    batch = loader.batch_size or 1
    total_loss, total_seen, steps = 0.0, 0, 0
    for order in _batch_orders(loader, epochs):
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            xb, yb = x_all[rows], y_all[rows]
            m = len(rows)
            logits = xb @ weight + bias
            top = logits.max(axis=1, keepdims=True)
            exp = np.exp(logits - top)
            norm = exp.sum(axis=1, keepdims=True)
            picked = np.arange(m)
            total_loss += float((np.log(norm[:, 0]) + top[:, 0] - logits[picked, yb]).sum())
            grad_logits = exp / norm
            grad_logits[picked, yb] -= 1.0
            grad_logits /= np.float32(m)
            grad_w = xb.T @ grad_logits
            grad_b = grad_logits.sum(axis=0)
            if anchor is not None:
                grad_w += mu32 * (weight - anchor[0])
                grad_b += mu32 * (bias - anchor[1])
            if momentum32 > 0:
                velocity = ((grad_w, grad_b) if velocity is None else
                            (momentum32 * velocity[0] + grad_w, momentum32 * velocity[1] + grad_b))
                grad_w, grad_b = velocity
            weight -= lr32 * grad_w
            bias -= lr32 * grad_b
            total_seen += m
            steps += 1
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
        linear.bias.copy_(torch.from_numpy(bias))
    return TrainResult(num_examples=len(loader.dataset), steps=steps, train_loss=total_loss / max(total_seen, 1))


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
