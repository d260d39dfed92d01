"""The ``userrep`` command line: one module per area, every command registered here.

userrep world generate --users 20000 --out data/world          cli/data.py
userrep data validate | thin | import lastfm-hetrec | deezer | movielens
userrep events compact
userrep train | embed | evaluate | tune                        cli/model.py
userrep features materialize
userrep batch list | show ID | gate ID | promote ID | rollback  cli/batch.py
userrep pipeline run | compile | submit                        cli/pipeline.py
userrep users forget ID...                                     cli/users.py
userrep serve | demo                                           cli/demo.py
"""

from __future__ import annotations

import typer

from userrep.cli import batch, data, demo, model, pipeline, users

app = typer.Typer(
    help="Generalized user representations: data, training, batches, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _logging() -> None:
    """Generalized user representations: data, training, batches, serving."""
    from userrep.cli.common import _error
    from userrep.logs import configure

    try:
        configure()  # the core's log lines are the commands' status lines (USERREP_LOG_LEVEL to change)
    except ValueError as exc:
        _error("error", str(exc))
        raise typer.Exit(code=2) from None


app.add_typer(data.world_app, name="world")
app.add_typer(model.features_app, name="features")
app.add_typer(batch.batch_app, name="batch")
app.add_typer(pipeline.pipeline_app, name="pipeline")
app.add_typer(data.data_app, name="data")
app.add_typer(data.events_app, name="events")
app.add_typer(users.users_app, name="users")
for command in (model.train, model.embed, model.evaluate, model.tune, demo.serve, demo.demo):
    app.command()(command)
