"""The small torch MLP every head uses: standardized input, one hidden layer, BCE loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 256
    epochs: int = 15
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    seed: int = 0


class MLPHead(nn.Module):
    def __init__(self, n_in: int, n_out: int, mean: np.ndarray, std: np.ndarray, config: HeadConfig,
                 prior: np.ndarray | None = None):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(n_in, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                                 nn.Linear(config.hidden, n_out))
        if prior is not None:  # start from the base rates: a head that learns nothing ranks by popularity
            p = np.clip(prior, 1e-6, 1 - 1e-6)
            with torch.no_grad():
                self.net[-1].bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def fit_mlp(x: np.ndarray, y: np.ndarray, config: HeadConfig, prior: np.ndarray | None = None) -> MLPHead:
    """Train on inputs (n, d) and binary targets (n, k) with BCE; deterministic for a seed."""
    torch.manual_seed(config.seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    mean, std = x.mean(axis=0), x.std(axis=0)
    head = MLPHead(x.shape[1], y.shape[1], mean, np.where(std > 1e-6, std, 1.0), config, prior)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn = nn.BCEWithLogitsLoss()
    head.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), config.batch_size):
            rows = order[start:start + config.batch_size]
            loss = loss_fn(head(xt[rows]), yt[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.no_grad()
def predict(head: MLPHead, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Logits (n, k)."""
    out = [head(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))).numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, head.net[-1].out_features), np.float32)
