"""The denoising autoencoder that compresses user features into one embedding.

Standardization stats live inside the model (buffers), so ``encode(raw_features)`` is all a
caller needs. Corruption during training has three parts:

* Gaussian noise and single-feature dropout on the standardized input (classic denoising);
* each feature group dropped with ``group_drop_rate`` (a skipped onboarding, a quiet week);
* **all history groups dropped together with ``history_drop_rate``** — our cold-start
  mechanism. The target stays the full clean vector, so the encoder learns to place a user seen
  only through onboarding and demographics where users with that history tend to be. A new user
  then gets an embedding in the same space, and as history arrives the input moves continuously
  from the "history absent" values to real ones, so the embedding moves smoothly too.

"Dropped" means set to the standardized value of a raw 0 — exactly what a user without that
signal looks like — not to the mean, which would look like an average listener.

The loss is the reconstruction MSE with every group weighted equally (a 32-d vector group
would otherwise outweigh a 4-d activity group eightfold), except for *share groups* (play shares
of the top artists): those are a distribution, so the decoder's outputs for them are logits and
the loss is the multinomial likelihood (softmax cross-entropy, as in Mult-DAE, Liang et al. 2018)
weighted as ``share_weight`` groups. MSE on these sparse shares kept little of them (R^2 0.29);
which artists a user plays is what listening tasks need. Validation nDCG@10 of the
future-listening head (synthetic world / Last.fm / Deezer): MSE over 128 shares 0.459 / 0.325 /
0.762; multinomial over 256, weight 32: 0.510 / 0.322 / 0.781 (the sweep: docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from userrep.features import FeatureSchema

SHARE_KINDS = ("artists",)  # groups holding a play distribution (shares that sum to <= 1)


@dataclass(frozen=True)
class AEConfig:
    latent: int = 64
    hidden: int = 256
    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    noise_std: float = 0.1
    feature_dropout: float = 0.05
    group_drop_rate: float = 0.1
    history_drop_rate: float = 0.25  # the cold-start mechanism (see module docstring)
    group_weighting: str = "equal"  # "equal": every group weighs the same; "features": every column does
    # "multinomial": share groups (artists_*) are reconstructed as a distribution (softmax +
    # cross-entropy, as in Mult-DAE); "mse": like every other group.
    share_loss: str = "multinomial"
    share_weight: float = 32.0  # a share group counts as this many groups (see module docstring)
    seed: int = 0
    # With N > 1 Ray Train workers: 1 = DDP, gradients averaged every step (the global batch, so
    # the model does not depend on N); k > 1 = local SGD, each worker steps on its own rows and
    # the parameters are averaged every k steps and at each epoch's end (less communication, a
    # slightly different model; docs/model.md, fit throughput). No effect in-process.
    average_every: int = 1
    # A fit continued from an anchor batch (``userrep.continuity``): how strongly each user's
    # embedding is held to the anchor's, as a multiple of the mean squared difference per
    # dimension: to the anchor model's embedding of the same input (the function) and to the
    # user's embedding in the anchor batch (the user's place). 0 for a fit from scratch.
    stability_weight: float = 0.0


class UserAutoencoder(nn.Module):
    # buffers (register_buffer): declared so their type is Tensor, not Tensor | Module
    mean: torch.Tensor
    std: torch.Tensor
    group_of: torch.Tensor
    is_history: torch.Tensor
    loss_weight: torch.Tensor

    def __init__(self, schema: FeatureSchema, mean: np.ndarray, std: np.ndarray, config: AEConfig):
        super().__init__()
        self.schema, self.config = schema, config
        n = schema.n_features
        group_of = np.repeat(np.arange(len(schema.groups)), [size for _, size in schema.groups])
        history = {name for name in schema.history_groups()}
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.register_buffer("group_of", torch.as_tensor(group_of, dtype=torch.long))
        self.register_buffer("is_history", torch.tensor([name in history for name, _ in schema.groups]))
        sizes = torch.tensor([size for _, size in schema.groups], dtype=torch.float32)
        if config.group_weighting not in ("equal", "features"):
            raise ValueError(f"group_weighting must be 'equal' or 'features', got {config.group_weighting!r}")
        weights = (1.0 / sizes)[self.group_of] if config.group_weighting == "equal" else torch.ones(n)
        if config.share_loss not in ("multinomial", "mse"):
            raise ValueError(f"share_loss must be 'multinomial' or 'mse', got {config.share_loss!r}")
        shares = [
            s
            for name, s in schema.slices().items()
            if config.share_loss == "multinomial" and name.split("_")[0] in SHARE_KINDS
        ]
        self.share_slices = shares
        is_share = torch.zeros(n, dtype=torch.bool)
        for sl in shares:
            is_share[sl] = True
        weights = weights / weights.sum()
        # A share group weighs what it would under MSE; its columns leave the MSE term.
        self.share_weights = [config.share_weight * float(weights[sl].sum()) for sl in shares]
        self.register_buffer("loss_weight", torch.where(is_share, 0.0, weights))
        self.encoder = nn.Sequential(nn.Linear(n, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.latent))
        self.decoder = nn.Sequential(nn.Linear(config.latent, config.hidden), nn.GELU(), nn.Linear(config.hidden, n))

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std

    @property
    def absent(self) -> torch.Tensor:
        """Standardized value of a raw 0 (the signal is missing)."""
        return -self.mean / self.std

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg, n_groups = self.config, len(self.schema.groups)
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=x.device)  # noqa: E731
        noisy = x + cfg.noise_std * torch.randn(x.shape, generator=generator, device=x.device)
        drop = rand(x.shape) < cfg.feature_dropout
        group_drop = rand(x.shape[0], n_groups) < cfg.group_drop_rate
        group_drop |= (rand(x.shape[0], 1) < cfg.history_drop_rate) & self.is_history
        drop |= group_drop[:, self.group_of]
        return torch.where(drop, self.absent.expand_as(x), noisy)

    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw feature rows -> embeddings (what backfill and serving call)."""
        return self.encoder(self.standardize(raw))

    def forward(self, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, embedding) of standardized, corrupted rows."""
        z = self.encoder(corrupted)
        return self.decoder(z), z

    def loss(
        self,
        raw: torch.Tensor,
        generator: torch.Generator | None = None,
        forward=None,
        anchor: nn.Module | None = None,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Group-weighted reconstruction loss of the clean input from a corrupted copy (MSE; share
        groups: multinomial, see the module docstring), plus, for a fit continued from an anchor
        batch, ``stability_weight`` times the mean squared distance of each clean input's
        embedding to the anchor encoder's embedding of it (``anchor``) and to the user's
        embedding in the anchor batch (``previous``; NaN rows: users the anchor did not know).

        The stability terms hold the embedding of the *clean* input, the one served: held on the
        corrupted copy instead, they taught the encoder to map noisy inputs to clean targets,
        which blurred its function on clean ones (a same-data retrain with another seed kept
        kNN@10 0.86 of the anchor's neighbours at any weight from 3 to 1000; 0.98 held on clean
        inputs). Both copies go through one forward call (one DDP step when distributed).

        ``forward`` is the module to run (a DDP wrapper of this model when distributed).
        """
        clean = self.standardize(raw)
        corrupted = self.corrupt(clean, generator)
        weight = self.config.stability_weight
        held_terms = bool(weight) and (anchor is not None or previous is not None)
        if held_terms:
            both_recon, both_z = (forward or self)(torch.cat([corrupted, clean]))
            recon, z = both_recon[: len(clean)], both_z[len(clean) :]
        else:
            recon, z = (forward or self)(corrupted)
        loss = (((recon - clean) ** 2) * self.loss_weight).sum(dim=1)
        if held_terms and anchor is not None:
            with torch.no_grad():
                held = anchor(clean)
            loss = loss + weight * ((z - held) ** 2).mean(dim=1)
        if held_terms and previous is not None:
            known = torch.isfinite(previous[:, :1])
            loss = loss + weight * torch.where(known, (z - torch.nan_to_num(previous)) ** 2, 0.0).mean(dim=1)
        for sl, weight in zip(self.share_slices, self.share_weights):
            # Multinomial likelihood minus its floor: sum(shares) * KL(shares normalized ||
            # softmax), 0 for a perfect reconstruction as with MSE; rows without plays add 0.
            shares = raw[:, sl]
            target = shares / shares.sum(dim=1, keepdim=True).clamp_min(1e-12)
            kl = torch.xlogy(shares, target) - shares * torch.log_softmax(recon[:, sl], dim=1)
            loss = loss + weight * kl.sum(dim=1)
        return loss.mean()

    def save(self, path: str | Path) -> None:
        torch.save({"schema": self.schema.groups, "config": asdict(self.config), "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path) -> UserAutoencoder:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        schema = FeatureSchema(tuple(tuple(g) for g in blob["schema"]))
        n = schema.n_features
        model = cls(schema, np.zeros(n), np.ones(n), AEConfig(**blob["config"]))
        model.load_state_dict(blob["state"])
        return model.eval()


def standardization(matrix: np.ndarray, chunk: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (std floored so constant columns stay finite), summed in float64 a
    chunk of rows at a time: ``matrix.std`` made a float64 copy of the whole matrix (5 GB for
    1M users)."""
    n = max(len(matrix), 1)
    total = np.zeros(matrix.shape[1], np.float64)
    for start in range(0, len(matrix), chunk):
        total += matrix[start : start + chunk].sum(axis=0, dtype=np.float64)
    mean = total / n
    squares = np.zeros_like(mean)
    for start in range(0, len(matrix), chunk):
        squares += np.square(matrix[start : start + chunk] - mean).sum(axis=0)
    std = np.sqrt(squares / n)
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


@torch.no_grad()
def embed(model: UserAutoencoder, matrix: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Embeddings of raw feature rows, in chunks (in-process path)."""
    model.eval()
    out = [
        model.encode(torch.from_numpy(np.ascontiguousarray(matrix[i : i + batch_size], dtype=np.float32))).numpy()
        for i in range(0, len(matrix), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.config.latent), np.float32)
