"""One coordinate system across batches: a batch built with an *anchor* (the batch serving when it
was planned) lands in the anchor's space, so a consumer's model trained on batch N keeps working
on batch N+1's embeddings, and a retrain with another seed lands where the first one did.

Three steps, each measured in docs/batches.md ("One space across batches"):

1. **Item vectors** of every encoder are rotated onto the anchor's by orthogonal Procrustes on the
   items both know (``userrep.encoders.align_vectors``); a new item sits in that basis where its own fit put it, so
   a feature column such as ``collab_30d[3]`` keeps its meaning. A rotation changes no distance.
2. **The autoencoder continues from the anchor's** (``warm_start``): each feature column takes the
   anchor's weights of the column of the same name, rescaled so that the new model computes
   exactly the anchor's embedding of every input at the start; a column the anchor did not have
   (a new top artist) starts at weight 0. It trains ``CONTINUED_EPOCHS`` epochs with a stability
   term (``AEConfig.stability_weight``): each embedding is held near the starting encoder's
   embedding of the same input, and near the user's embedding in the anchor batch. The weight is
   chosen on validation users (``choose_weight``): the largest of ``WEIGHTS`` whose validation
   reconstruction loss is within ``TOLERANCE`` of the best candidate's.
3. **Whatever rotation is left** (the latent space can turn freely under the reconstruction loss)
   is removed exactly: the orthogonal map that best takes the new embeddings onto the anchor
   model's embeddings of the same users is folded into the encoder's last layer and the
   decoder's first (``fold_rotation``), so nothing is applied at backfill or serving time.

A batch without an anchor (the first one; ``align_to="none"``), or whose latent or hidden size
differs from its anchor's, is fitted from scratch: a new space, said in its manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from userrep.encoders import rotation_onto
from userrep.features import FeatureSpace, UserFeatures
from userrep.model import AEConfig, UserAutoencoder, embed, standardization

log = logging.getLogger(__name__)

# Stability weights tried on the validation users. The rule picks the largest within TOLERANCE:
# 3 on the demo's world a month later (10 cost 1.4% reconstruction), 10 on Last.fm and on a
# same-data retrain, where holding the space costs nothing (docs/batches.md, "One space").
WEIGHTS = (0.0, 1.0, 3.0, 10.0)
TOLERANCE = 0.01  # relative: how much validation reconstruction a larger weight may cost
CONTINUED_EPOCHS = 5  # a continued fit starts at the anchor's optimum (20 epochs changed nothing measured)
VALID_SHARE = 0.1  # of the sample, held out to choose the weight
MAX_USERS = 50_000  # the weight is chosen on a seeded sample of at most this many users
ROTATION_ROWS = 8_000  # users the left-over rotation is fitted on


@dataclass(frozen=True)
class Anchor:
    """What a batch built in another's space needs of it."""

    batch_id: str
    space: FeatureSpace
    model: UserAutoencoder
    user_ids: np.ndarray  # its embeddings' users, in file order
    embeddings: np.ndarray  # (users, latent)

    @property
    def columns(self) -> list[str]:
        return column_names(self.space)


def load_anchor(batch_dir: str | Path) -> Anchor:
    from userrep.backfill import load_encoder, read_embeddings
    from userrep.batch.layout import BatchDir

    space, model = load_encoder(batch_dir)
    ids, vectors, batch_id = read_embeddings(BatchDir(batch_dir).embeddings)
    return Anchor(batch_id, space, model, ids, vectors)


def column_names(space: FeatureSpace) -> list[str]:
    """Every feature column's name, in matrix order (what names a column across batches)."""
    return [name for _, name, _ in space.column_names()]


# -- 1. item vectors ------------------------------------------------------------------------------


# ``userrep.encoders.align_vectors``, applied to every encoder by ``fit_feature_space(anchor=)``.


# -- 2. the autoencoder continued ----------------------------------------------------------------


def columns_of(matrix: np.ndarray, columns: list[str], wanted: list[str]) -> np.ndarray:
    """``matrix`` (with ``columns``) as rows over ``wanted`` columns; a column it lacks is 0 (absent)."""
    where = pd.Index(columns).get_indexer(pd.Index(wanted))
    out = np.zeros((len(matrix), len(wanted)), np.float32)
    out[:, where >= 0] = matrix[:, where[where >= 0]]
    return out


def compatible(anchor: Anchor, ae: AEConfig) -> str | None:
    """Why a model of ``ae`` cannot continue the anchor's (None: it can)."""
    theirs = anchor.model.config
    if (theirs.latent, theirs.hidden) != (ae.latent, ae.hidden):
        return f"the anchor's latent/hidden sizes {theirs.latent}/{theirs.hidden} differ from {ae.latent}/{ae.hidden}"
    return None


def warm_start(anchor: Anchor, features: UserFeatures, columns: list[str], ae: AEConfig) -> UserAutoencoder:
    """A model of ``features``' schema and standardization that computes exactly the anchor's
    embedding of every input (columns matched by name; a column the anchor lacks weighs 0, one it
    had and these features lack counts as absent), and whose decoder reconstructs as the
    anchor's does. The first layer absorbs the change of standardization."""
    mean, std = standardization(features.matrix)
    torch.manual_seed(ae.seed)
    model = UserAutoencoder(features.schema, mean, std, ae)
    old = anchor.model
    where = pd.Index(anchor.columns).get_indexer(pd.Index(columns))
    kept, source = np.flatnonzero(where >= 0), where[where >= 0]
    old_mean, old_std = old.mean.numpy(), old.std.numpy()
    with torch.no_grad():
        w_old, b_old = _linear(old.encoder, 0).weight.numpy(), _linear(old.encoder, 0).bias.numpy()
        w = np.zeros((w_old.shape[0], len(columns)), np.float32)
        w[:, kept] = w_old[:, source] * (std[kept] / old_std[source])
        # the same pre-activation on raw input: W_old (x - m_old) / s_old + b_old = W (x - m) / s + b
        bias = b_old - w_old @ (old_mean / old_std) + w @ (mean / std)
        _linear(model.encoder, 0).weight.copy_(torch.from_numpy(w))
        _linear(model.encoder, 0).bias.copy_(torch.from_numpy(bias.astype(np.float32)))
        _linear(model.encoder, 2).load_state_dict(_linear(old.encoder, 2).state_dict())
        _linear(model.decoder, 0).load_state_dict(_linear(old.decoder, 0).state_dict())
        out_w, out_b = _linear(model.decoder, 2).weight.numpy().copy(), _linear(model.decoder, 2).bias.numpy().copy()
        w_out, b_out = _linear(old.decoder, 2).weight.numpy(), _linear(old.decoder, 2).bias.numpy()
        logits = np.zeros(len(columns), bool)  # share groups: the decoder outputs logits, not standardized values
        for sl in model.share_slices:
            logits[sl] = True
        scale = np.where(logits[kept], 1.0, old_std[source] / std[kept])
        out_w[kept] = w_out[source] * scale[:, None]
        out_b[kept] = np.where(
            logits[kept], b_out[source], (b_out[source] * old_std[source] + old_mean[source] - mean[kept]) / std[kept]
        )
        _linear(model.decoder, 2).weight.copy_(torch.from_numpy(out_w))
        _linear(model.decoder, 2).bias.copy_(torch.from_numpy(out_b))
    return model


def _linear(layers: torch.nn.Sequential, i: int) -> torch.nn.Linear:
    layer = layers[i]
    assert isinstance(layer, torch.nn.Linear), f"layer {i} is a {type(layer).__name__}"
    return layer


def previous_embeddings(anchor: Anchor, user_ids: np.ndarray) -> np.ndarray:
    """(users, latent) each user's embedding in the anchor batch; NaN for users it did not know."""
    rows = pd.Index(anchor.user_ids).get_indexer(pd.Index(user_ids))
    out = np.full((len(user_ids), anchor.embeddings.shape[1]), np.nan, np.float32)
    out[rows >= 0] = anchor.embeddings[rows[rows >= 0]]
    return out


def validation_loss(model: UserAutoencoder, matrix: np.ndarray, seed: int = 0) -> float:
    """The reconstruction loss (no stability term) of held-out rows, with a fixed corruption draw."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(model.loss(torch.from_numpy(np.ascontiguousarray(matrix, np.float32)), generator))


def choose_weight(anchor: Anchor, features: UserFeatures, columns: list[str], ae: AEConfig) -> dict:
    """The stability weight, chosen on validation users: each of ``WEIGHTS`` continues the anchor's
    model on a seeded sample of at most ``MAX_USERS`` users less ``VALID_SHARE`` of them; the
    largest weight whose held-out reconstruction loss is within ``TOLERANCE`` of the best one's
    wins. Returns the choice and every candidate's loss."""
    from userrep.train import fit_autoencoder

    rng = np.random.default_rng(ae.seed)
    sample = np.sort(rng.choice(len(features.user_ids), size=min(MAX_USERS, len(features.user_ids)), replace=False))
    held = rng.permutation(sample)[: max(1, int(round(VALID_SHARE * len(sample))))]
    fit_rows = np.setdiff1d(sample, held)
    held = np.sort(held)
    previous = previous_embeddings(anchor, features.user_ids[fit_rows])
    losses = {}
    for weight in WEIGHTS:
        config = replace(ae, epochs=CONTINUED_EPOCHS, stability_weight=weight)
        fitted = fit_autoencoder(
            features.rows(fit_rows), config, init=warm_start(anchor, features, columns, config), previous=previous
        ).model
        losses[weight] = round(validation_loss(fitted, features.matrix[held], ae.seed), 6)
    best = min(losses.values())
    chosen = max(w for w, loss in losses.items() if loss <= best * (1 + TOLERANCE))
    return {"weight": chosen, "validation_loss": {str(w): v for w, v in losses.items()}, "validation_users": len(held)}


# -- 3. the rotation left over -------------------------------------------------------------------


def fold_rotation(model: UserAutoencoder, rotation: np.ndarray) -> UserAutoencoder:
    """The model whose embedding is ``z @ rotation`` for its old ``z``, with the same
    reconstruction (the decoder's first layer takes the inverse, ``rotation.T``)."""
    r = torch.from_numpy(np.asarray(rotation, np.float32))
    with torch.no_grad():
        last, first = _linear(model.encoder, 2), _linear(model.decoder, 0)
        last.weight.copy_(r.T @ last.weight)
        last.bias.copy_(last.bias @ r)
        first.weight.copy_(first.weight @ r)
    return model


def rotate_onto_anchor(model: UserAutoencoder, anchor: Anchor, features: UserFeatures, columns: list[str], seed: int):
    """Fold in the rotation that takes ``model``'s embeddings of a sample of users onto the
    anchor model's embeddings of the same users' features (the same time); returns how far it
    turned (the Frobenius distance of the rotation from the identity)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(features.user_ids), size=min(ROTATION_ROWS, len(features.user_ids)), replace=False))
    ours = embed(model, features.matrix[rows])
    theirs = embed(anchor.model, columns_of(features.matrix[rows], columns, anchor.columns))
    rotation = rotation_onto(ours, theirs)
    fold_rotation(model, rotation)
    return float(np.linalg.norm(rotation - np.eye(len(rotation))))


# -- the whole step -----------------------------------------------------------------------------


def continue_fit(features: UserFeatures, space: FeatureSpace, anchor: Anchor | None, ae: AEConfig, **fit_options):
    """The batch's autoencoder: continued from ``anchor`` (steps 2 and 3 of the module docstring)
    where it can be, else fitted from scratch. ``fit_options``: ``userrep.train.fit_autoencoder``'s
    (workers, checkpoint_dir, resume, progress). Returns (FitResult, the manifest's ``aligned_to``:
    the anchor's id and what was chosen, or ``batch_id`` None and why)."""
    from userrep.train import fit_autoencoder

    if anchor is None:
        reason = "no batch to continue (the first batch, or align_to=none)"
        return fit_autoencoder(features, ae, **fit_options), {"batch_id": None, "reason": reason}
    if (why := compatible(anchor, ae)) is not None:
        log.warning(f"a new space, not continuing batch {anchor.batch_id}: {why}")
        return fit_autoencoder(features, ae, **fit_options), {"batch_id": None, "reason": why}
    columns = column_names(space)
    choice = choose_weight(anchor, features, columns, ae)
    continued = replace(ae, epochs=CONTINUED_EPOCHS, stability_weight=choice["weight"])
    log.info(
        f"continuing batch {anchor.batch_id}'s space: stability weight {choice['weight']} "
        f"(validation loss by weight {choice['validation_loss']})"
    )
    fit = fit_autoencoder(
        features,
        continued,
        init=warm_start(anchor, features, columns, continued),
        previous=previous_embeddings(anchor, features.user_ids),
        **fit_options,
    )
    turned = rotate_onto_anchor(fit.model, anchor, features, columns, ae.seed)
    shared = int((pd.Index(anchor.columns).get_indexer(pd.Index(columns)) >= 0).sum())
    return fit, {
        "batch_id": anchor.batch_id,
        "stability_weight": choice["weight"],
        "epochs": CONTINUED_EPOCHS,
        "validation_loss": choice["validation_loss"],
        "validation_users": choice["validation_users"],
        "columns_shared": shared,
        "columns_new": len(columns) - shared,
        "rotation_residual": round(turned, 6),
    }
