"""`BatchSpec`: the one settings object, as JSON, as a KFP Struct and as `--param` text."""

from __future__ import annotations

import json

import pytest

from userrep.batch.spec import BatchSpec

SPEC = BatchSpec(data="/w/world", batch_root="/w/batches", as_of="2026-05-01", dim=16, epochs=3, tune=True)


def test_a_spec_survives_json_and_a_kfp_struct_where_numbers_are_floats():
    assert BatchSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC
    struct = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in SPEC.to_dict().items()}
    assert struct["dim"] == 16.0
    back = BatchSpec.from_dict(struct)
    assert back == SPEC and isinstance(back.dim, int) and back.tune is True


@pytest.mark.parametrize(
    "values, field",
    [
        ({"dim": 16.5}, "spec.dim"),  # not integral
        ({"tune": "yes"}, "spec.tune"),  # a bool field takes a bool
        ({"epochs": 0}, "spec.epochs"),  # out of range
        ({"online": "memcached"}, "spec.online"),
        ({"workrs": 2}, "spec.workrs"),  # a typo is not silently dropped
        ({"data": ""}, "spec.data"),
    ],
)
def test_a_bad_setting_is_an_error_naming_the_field(values, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        BatchSpec.from_dict({**SPEC.to_dict(), **values})


def test_a_required_setting_missing_is_an_error():
    with pytest.raises(ValueError, match=r"spec\.batch_root: required"):
        BatchSpec.from_dict({"data": "/w/world"})


def test_settings_as_text_are_parsed_by_their_field_type():
    changed = SPEC.with_text({"epochs": "5", "tune": "false", "as_of": "2026-06-30"})
    assert (changed.epochs, changed.tune, changed.as_of) == (5, False, "2026-06-30")
    assert changed.replace(epochs=3, tune=True, as_of="2026-05-01") == SPEC
    with pytest.raises(ValueError, match=r"spec\.epochs: expected an integer"):
        SPEC.with_text({"epochs": "many"})
    with pytest.raises(ValueError, match=r"spec\.nope: unknown setting"):
        SPEC.with_text({"nope": "1"})


def test_the_one_set_of_defaults_is_what_the_cli_and_the_compiled_pipeline_use():
    from typer.main import get_command

    from pipelines.training import CLUSTER_SPEC
    from userrep.cli import app

    defaults = BatchSpec(data="d", batch_root="b").to_dict()
    places = ("data", "batch_root", "feast_home")  # the cluster's volume
    assert CLUSTER_SPEC["workers"] == 2 and defaults["workers"] == 0  # a cluster fits on Ray Train
    assert {k: v for k, v in CLUSTER_SPEC.items() if k not in (*places, "workers")} == {
        k: v for k, v in defaults.items() if k not in (*places, "workers")
    }
    cli = get_command(app).commands  # type: ignore[attr-defined]
    for command, names in (
        (cli["pipeline"].commands["run"], ("dim", "epochs", "workers", "label_days", "seed")),
        (cli["train"], ("dim", "epochs", "workers", "average_every", "label_days", "seed")),
        (cli["demo"], ("epochs", "workers")),
    ):
        options = {p.name: p.default for p in command.params}
        for name in names:
            assert options[name] == defaults[name], (command.name, name)


def test_submit_params_change_the_compiled_spec_field_by_field(tmp_path):
    from pipelines.runner import compile_pipelines
    from pipelines.training import CLUSTER_SPEC
    from userrep.cli.pipeline import submit_arguments

    package = next(p for p in compile_pipelines(tmp_path) if p.stem == "training")
    arguments = submit_arguments(package, ["epochs=5", "online=redis", "ray_address=http://head:8265"])
    assert arguments == {"spec": {**CLUSTER_SPEC, "epochs": 5, "online": "redis"}, "ray_address": "http://head:8265"}
    with pytest.raises(ValueError, match=r"spec\.epochs: expected an integer"):
        submit_arguments(package, ["epochs=many"])
    with pytest.raises(ValueError, match=r"spec\.online"):
        submit_arguments(package, ["online=memcached"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        submit_arguments(package, ["epochs"])
