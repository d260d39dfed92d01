"""Autoencoder fit throughput: plain torch in-process vs Ray Train with 1 and 2 workers, the same
features and configuration, in one run (JSON). The modes take turns for ``--repeats`` rounds and
each reports its median: on a shared 2-core box one run of a mode varies by up to 30%.

Needs a batch in WORK (run `make demo` first); its training features are the input.

    python bench/fit_throughput.py [--work work] [--epochs 10] [--repeats 3]

Modes: in-process; Ray Train with 1 worker; 2 workers with DDP (gradients averaged every step);
2 workers with local SGD (parameters averaged every 4 steps, `AEConfig.average_every`).
Per mode: the wall time of `fit_autoencoder` (Ray Train's start-up included), the steady rate
(samples/s between the first and the last epoch's checkpoint, start-up excluded), the final
loss, the rate as a share of the in-process one, and the share of this box's fp32 matmul peak
(a 2048 x 2048 `torch.mm`) the in-process loop reaches (forward + backward = 3x the forward
multiply-adds of the four linear layers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

# (name, Ray Train workers (0: in-process), AEConfig.average_every)
MODES = (
    ("torch_in_process", 0, 1),
    ("ray_train_1_worker", 1, 1),
    ("ray_train_2_workers_ddp", 2, 1),
    ("ray_train_2_workers_local_sgd_4", 2, 4),
)


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
    return 2 * 2048**3 * n / (time.perf_counter() - started) / 1e9


def main() -> None:
    from userrep.batch.build import load_features
    from userrep.batch.registry import read_pointer
    from userrep.model import AEConfig
    from userrep.raylocal import ray_session
    from userrep.train import fit_autoencoder

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = args.work / "batches"
    features = load_features(root / read_pointer(root)["serving"])
    config = replace(AEConfig(), epochs=args.epochs)
    rows, n = features.matrix.shape
    flops = 3 * 2 * (n * config.hidden + config.hidden * config.latent) * 2  # 4 layers, fwd + bwd
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="fit-bench-") as scratch:
        for _ in range(args.repeats):
            for name, workers, every in MODES:
                checkpoints = Path(scratch) / name
                started = time.perf_counter()
                if workers == 0:
                    fit = fit_autoencoder(features, config, checkpoint_dir=checkpoints)
                else:
                    with ray_session(num_cpus=2):
                        fit = fit_autoencoder(
                            features, replace(config, average_every=every), workers=workers, checkpoint_dir=checkpoints
                        )
                runs.setdefault(name, []).append(
                    {
                        "wall_s": time.perf_counter() - started,
                        "steady_samples_per_s": steady_rate(checkpoints, rows),
                        "final_loss": fit.losses[-1],
                    }
                )
    results = {
        name: {
            "wall_s": round(statistics.median(r["wall_s"] for r in each), 1),
            "steady_samples_per_s": round(statistics.median(r["steady_samples_per_s"] for r in each)),
            "steady_runs": [round(r["steady_samples_per_s"]) for r in each],
            "final_loss": round(each[-1]["final_loss"], 4),
        }
        for name, each in runs.items()
    }
    base = results["torch_in_process"]["steady_samples_per_s"]
    for result in results.values():
        result["steady_vs_in_process"] = round(result["steady_samples_per_s"] / base, 2)
    peak = matmul_peak_gflops()
    print(
        json.dumps(
            {
                "users": rows,
                "features": n,
                "epochs": args.epochs,
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
                "results": results,
                "matmul_peak_gflops": round(peak, 1),
                "in_process_share_of_peak": round(base * flops / 1e9 / peak, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
