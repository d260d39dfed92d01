"""Autoencoder fit throughput: plain torch in-process vs Ray Train with 1 and 2 workers, the same
features and configuration, in one run (JSON).

Needs a batch in WORK (run `make demo` first); its training features are the input.

    python bench/fit_throughput.py [--work work] [--epochs 10]

Per mode: the wall time of `fit_autoencoder` (Ray Train's start-up included), the steady rate
(samples/s between the first and the last epoch's checkpoint, start-up excluded), the final
loss, the rate as a share of the in-process one, and the share of this box's fp32 matmul peak
(a 2048 x 2048 `torch.mm`) the in-process loop reaches (forward + backward = 3x the forward
multiply-adds of the four linear layers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def steady_rate(checkpoints: Path, rows: int) -> float:
    """Samples/s between the first and the last epoch's checkpoint (start-up excluded)."""
    stamps = sorted(p.stat().st_mtime for p in checkpoints.glob("epoch_*.pt"))
    return rows * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def matmul_peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    started, n = time.perf_counter(), 10
    for _ in range(n):
        torch.mm(a, b)
    return 2 * 2048 ** 3 * n / (time.perf_counter() - started) / 1e9


def main() -> None:
    from userrep.batches import read_pointer
    from userrep.build import load_features
    from userrep.model import AEConfig
    from userrep.raylocal import ray_session
    from userrep.train import fit_autoencoder

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    root = args.work / "batches"
    features = load_features(root / read_pointer(root)["serving"])
    config = replace(AEConfig(), epochs=args.epochs)
    rows, n = features.matrix.shape
    flops = 3 * 2 * (n * config.hidden + config.hidden * config.latent) * 2  # 4 layers, fwd + bwd
    results = {}
    with tempfile.TemporaryDirectory(prefix="fit-bench-") as scratch:
        for workers in (0, 1, 2):
            name = "torch_in_process" if workers == 0 else f"ray_train_{workers}_workers"
            checkpoints = Path(scratch) / name
            started = time.perf_counter()
            if workers == 0:
                fit = fit_autoencoder(features, config, checkpoint_dir=checkpoints)
            else:
                with ray_session(num_cpus=2):
                    fit = fit_autoencoder(features, config, workers=workers, checkpoint_dir=checkpoints)
            results[name] = {"wall_s": round(time.perf_counter() - started, 1),
                             "steady_samples_per_s": round(steady_rate(checkpoints, rows)),
                             "final_loss": round(fit.losses[-1], 4)}
    base = results["torch_in_process"]["steady_samples_per_s"]
    for result in results.values():
        result["steady_vs_in_process"] = round(result["steady_samples_per_s"] / base, 2)
    peak = matmul_peak_gflops()
    print(json.dumps({"users": rows, "features": n, "epochs": args.epochs, "torch_threads": torch.get_num_threads(),
                      "results": results, "matmul_peak_gflops": round(peak, 1),
                      "in_process_share_of_peak": round(base * flops / 1e9 / peak, 3)}, indent=2))


if __name__ == "__main__":
    main()
