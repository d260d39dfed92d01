"""`userrep batch list | show | gate | promote | rollback | pin | unpin | prune`: the batch registry
and the gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from userrep.batch.layout import manifest_path
from userrep.cli.common import ROOT_OPTION, _batch_call, _run_or_exit, console

batch_app = typer.Typer(help="Batches: list, show, gate, promote, roll back, pin.", no_args_is_help=True)


@batch_app.command("list")
def batch_list(root: ROOT_OPTION = Path("work/batches")) -> None:
    """Every batch with its state (serving, previous, gated, rejected, candidate, incomplete, failed)
    and the consumers pinned to it."""
    from userrep.batch.registry import list_batches

    table = Table(title=f"batches in {root}", title_justify="left")
    for column in ("batch_id", "as_of", "created_at", "users", "state", "pinned by"):
        table.add_column(column)
    for row in list_batches(root):
        style = {"serving": "bold green", "rejected": "red", "failed": "red"}.get(row["state"], "")
        table.add_row(
            *(str(row[c]) for c in ("batch_id", "as_of", "created_at", "users")),
            f"[{style}]{row['state']}[/]" if style else row["state"],
            ", ".join(row["pinned_by"]),
        )
    console.print(table)


@batch_app.command("show")
def batch_show(
    batch_id: Annotated[str, typer.Argument(help="Batch id.")], root: ROOT_OPTION = Path("work/batches")
) -> None:
    """Manifest, downstream metrics, gate decision of one batch (JSON)."""
    from userrep.batch.registry import show

    print(json.dumps(_batch_call(lambda: show(root, batch_id)), indent=2))


@batch_app.command("gate")
def batch_gate(
    batch_id: Annotated[str, typer.Argument(help="Candidate batch id.")],
    root: ROOT_OPTION = Path("work/batches"),
    data: Annotated[
        Path | None, typer.Option(help="Dataset directory; default: the one the batch was built on.")
    ] = None,
) -> None:
    """Measure the candidate against the serving batch, decide, write gate.json, rollout.html and drift_report.html."""
    from userrep.batch.layout import BatchDir

    record = _gate(root, batch_id, data)
    console.print(f"rollout report: {BatchDir(root / batch_id).rollout_report}")
    raise typer.Exit(code=0 if record["passed"] else 3)


def _gate(root: Path, batch_id: str, data: Path | None) -> dict:
    from userrep.batch.gate import gate_batch

    record = _batch_call(lambda: _run_or_exit(lambda: gate_batch(root, batch_id, data)))
    _print_gate(record)
    return record


def _print_gate(record: dict) -> None:
    verdict = "[bold green]PASS[/]" if record["passed"] else "[bold red]BLOCK[/]"
    table = Table(
        title=f"gate {record['candidate']} vs serving {record['serving'] or '(none)'}: {verdict}", title_justify="left"
    )
    for column in ("check", "value", "limit", "ok"):
        table.add_column(column)
    for name, check in record["checks"].items():
        value = check["value"]
        if isinstance(value, dict) and "candidate" in value:
            value = f"{value['candidate']:.4f} vs {value['serving']:.4f}"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(name, str(value), str(check["limit"]), "[green]yes[/]" if check["passed"] else "[red]no[/]")
    console.print(table)
    for reason in record["reasons"]:
        console.print(f"[red]blocked:[/] {reason}", highlight=False)


LOCK_REDIS_OPTION = Annotated[
    str,
    typer.Option(
        "--lock-redis",
        help="HOST:PORT of a Redis to hold the pointer lock in (a cluster's batch root on a shared volume; "
        "password from REDIS_PASSWORD or REDIS_PASSWORD_FILE); empty: a file lock in ROOT.",
    ),
]


def _lock_redis(address: str) -> str | None:
    from userrep.store import store_config

    return store_config(".", "redis", address).redis if address else None


@batch_app.command("promote")
def batch_promote(
    batch_id: Annotated[str, typer.Argument(help="Batch id.")],
    root: ROOT_OPTION = Path("work/batches"),
    lock_redis: LOCK_REDIS_OPTION = "",
) -> None:
    """Serve this batch (gate passed, all models present): one atomic pointer switch."""
    from userrep.batch.registry import promote

    pointer = _batch_call(lambda: promote(root, batch_id, _lock_redis(lock_redis)))
    console.print(
        f"serving {pointer['serving']} (previous: {pointer['history'][-1] if pointer['history'] else 'none'})"
    )


@batch_app.command("rollback")
def batch_rollback(root: ROOT_OPTION = Path("work/batches"), lock_redis: LOCK_REDIS_OPTION = "") -> None:
    """Serve the previous batch again."""
    from userrep.batch.registry import rollback

    pointer = _batch_call(lambda: rollback(root, _lock_redis(lock_redis)))
    console.print(f"serving {pointer['serving']} again (rolled back from {pointer['rolled_back_from']})")


CONSUMER_OPTION = Annotated[
    str, typer.Option("--consumer", help="The consuming team or model (letters, digits, '.', '_', '-').")
]


@batch_app.command("pin")
def batch_pin(
    batch_id: Annotated[str, typer.Argument(help="The batch the consumer's model was trained on.")],
    consumer: CONSUMER_OPTION,
    root: ROOT_OPTION = Path("work/batches"),
    lock_redis: LOCK_REDIS_OPTION = "",
) -> None:
    """Declare that a consumer is on this batch: it stays live (reads with its batch_id, events
    applied) and is never pruned until the consumer moves or unpins."""
    from userrep.batch.registry import pin

    _batch_call(lambda: pin(root, batch_id, consumer, _lock_redis(lock_redis)))
    console.print(f"{consumer} is pinned to {batch_id}")


@batch_app.command("unpin")
def batch_unpin(
    consumer: CONSUMER_OPTION, root: ROOT_OPTION = Path("work/batches"), lock_redis: LOCK_REDIS_OPTION = ""
) -> None:
    """The consumer is on no batch any more."""
    from userrep.batch.registry import unpin

    pointer = _batch_call(lambda: unpin(root, consumer, _lock_redis(lock_redis)))
    console.print(f"{consumer} unpinned; pins left: {pointer['pins'] or 'none'}")


@batch_app.command("prune")
def batch_prune(
    keep: Annotated[int, typer.Option(min=0, help="Finished batches to keep, newest first (besides these two).")],
    root: ROOT_OPTION = Path("work/batches"),
    feast_home: Annotated[
        Path, typer.Option(help="The Feast home whose rows of removed batches go too (skipped if absent).")
    ] = Path("work/feast"),
    online: Annotated[str, typer.Option(help="Online store: sqlite or redis.")] = "sqlite",
    redis: Annotated[str, typer.Option(help="Redis HOST:PORT (online store and pointer lock) with --online redis.")] = (
        "127.0.0.1:6379"
    ),
) -> None:
    """Remove old batches and their offline and online rows; never the serving batch, the one a
    rollback returns to or a pinned one."""
    from userrep.batch.layout import BatchDir
    from userrep.batch.registry import prune

    on_remove, store_note = None, f"{feast_home}: no Feast home; only the batch directories go"
    if feast_home.is_dir():
        from userrep.backfill import read_embeddings
        from userrep.batchrows import unpublish_batch
        from userrep.store import open_store, store_config

        config = store_config(feast_home, online, redis)
        store = open_store(config, apply=False)

        def on_remove(path: Path) -> None:
            ids, _, batch_id = read_embeddings(BatchDir(path).embeddings)
            unpublish_batch(store, config, batch_id, ids)

        store_note = f"their rows removed from {feast_home}"
    lock = _lock_redis(redis) if online == "redis" else None
    result = _batch_call(lambda: prune(root, keep, on_remove, lock))
    console.print(
        f"removed {len(result['removed'])} batch(es) {', '.join(result['removed']) or ''} ({store_note}); "
        f"kept {', '.join(result['kept'])}"
    )


def _print_downstream(root: Path, ids: list[str]) -> None:
    from userrep.batch.registry import show

    table = Table(title="downstream models (validation on the batch's own label window)", title_justify="left")
    table.add_column("task / metric")
    for batch_id in ids:
        table.add_column(batch_id, justify="right")
    infos = [show(root, b)["downstream"] if manifest_path(root / b).exists() else {} for b in ids]
    keys = sorted({(t, m) for info in infos for t, values in info.items() for m in values})
    for task, metric in keys:
        table.add_row(f"{task} {metric}", *(f"{info.get(task, {}).get(metric, float('nan')):.4f}" for info in infos))
    console.print(table)
