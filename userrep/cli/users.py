"""`userrep users forget ID...`: the right to erasure (``userrep.forget``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from userrep.cli.common import ROOT_OPTION, _run_or_exit, console

users_app = typer.Typer(help="Users: erase them from every store.", no_args_is_help=True)


@users_app.command("forget")
def users_forget(
    user_ids: Annotated[list[str], typer.Argument(help="The user ids to erase.")],
    data: Annotated[Path, typer.Option(help="The dataset the users are erased from (the erasure is recorded in it).")],
    root: ROOT_OPTION = Path("work/batches"),
    feast_home: Annotated[Path, typer.Option(help="The Feast home (skipped if absent).")] = Path("work/feast"),
    log: Annotated[
        str,
        typer.Option(
            help="The online service's event log: a SQLite file (skipped if absent), or redis://HOST:PORT/STREAM."
        ),
    ] = "work/online/events.sqlite",
    online: Annotated[str, typer.Option(help="Online store: sqlite or redis.")] = "sqlite",
    redis: Annotated[str, typer.Option(help="Redis HOST:PORT (online store and pointer lock) with --online redis.")] = (
        "127.0.0.1:6379"
    ),
) -> None:
    """Erase users from the dataset, every batch, the Feast store and the event log, and record it so nothing brings them back."""
    from userrep.cli.batch import _lock_redis
    from userrep.erasure import ERASURES
    from userrep.forget import forget
    from userrep.store import store_config

    events_log = log if log.startswith("redis://") or Path(log).exists() else None
    lock = _lock_redis(redis) if online == "redis" else None
    config = store_config(feast_home, online, redis)
    report = _run_or_exit(lambda: forget(user_ids, data, root if root.is_dir() else None, config, events_log, lock))
    done = report.get("log") or {}
    console.print(
        f"erased {report['users']} user(s) at {report['erased_at']} (recorded in "
        + ", ".join(f"{path}/{ERASURES}" for path in report["datasets"])
        + (" and the event log" if events_log else "")
        + ")"
    )
    console.print(f"  dataset: {_rows(report.get('dataset', {}))}")
    console.print(f"  batches: {_rows(report.get('batches', {}), 'embedding(s)')}")
    console.print(
        f"  feast {feast_home}: " + (_rows(report["feast"]) if "feast" in report else "no Feast home, skipped")
    )
    if events_log:
        console.print(
            f"  event log: {done['records_removed']} record(s) removed, {done['records_rewritten']} rewritten, "
            f"{done['states']} state row(s) removed"
            + (
                f"; {done['records_left']} shared record(s) keep their events, unread, until retention trims them"
                if done["records_left"]
                else ""
            )
        )
    else:
        console.print(f"  event log: {log} not found, skipped")


def _rows(removed: dict, what: str = "row(s)") -> str:
    shown = {name: n for name, n in removed.items() if n}
    return ", ".join(f"{name} {n} {what}" for name, n in shown.items()) or "nothing held them"
