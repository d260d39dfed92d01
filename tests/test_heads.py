"""Task heads on disk: what older batches wrote still loads."""

from __future__ import annotations

import numpy as np


def test_heads_saved_with_the_old_layer_names_still_load(tmp_path):
    """Batches written before the heads grew side features name their layers net.0 / net.3."""
    import torch

    from userrep.downstream import _save_head, load_head
    from userrep.tasks._mlp import HeadConfig, MLPHead, predict

    head = MLPHead(4, 3, np.zeros(4), np.ones(4), HeadConfig(hidden=8))
    _save_head(tmp_path / "new.pt", head, {"task": "t"})
    blob = torch.load(tmp_path / "new.pt", weights_only=False)
    blob["state"] = {k.replace("hidden.0.", "net.0.").replace("out.", "net.3."): v for k, v in blob["state"].items()}
    del blob["n_side"]
    torch.save(blob, tmp_path / "old.pt")
    loaded, meta = load_head(tmp_path / "old.pt")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    assert meta == {"task": "t"} and np.allclose(predict(loaded, x), predict(head.eval(), x))
