"""Logging's one configuration point: every package of ours reaches stdout once, at its level."""

from __future__ import annotations

import logging

from userrep.logs import OURS, configure


def test_every_package_of_ours_logs_to_the_current_stderr_once(capsys):
    configure("INFO")
    configure("INFO")  # configuring again replaces the handler: still one line per record
    for name in OURS:
        logging.getLogger(f"{name}.somewhere").info("ready: %s", name)
    logging.getLogger("userrep.x").debug("not at INFO")
    logging.getLogger("serving.x").warning("reload failed")
    captured = capsys.readouterr()
    out = captured.err.splitlines()
    assert captured.out == ""  # stdout stays for a command's output
    assert out == [f"ready: {name}" for name in OURS] + ["warning: reload failed"]


def test_a_bad_level_is_one_clear_line(monkeypatch):
    from typer.testing import CliRunner

    from userrep.cli import app

    monkeypatch.setenv("USERREP_LOG_LEVEL", "LOUD")
    result = CliRunner().invoke(app, ["batch", "list", "--root", "nowhere"])
    assert result.exit_code == 2 and "USERREP_LOG_LEVEL: 'LOUD'" in result.output and "Traceback" not in result.output


def test_noisy_third_party_info_is_quieted():
    configure()
    assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)
    assert logging.getLogger("ray").isEnabledFor(logging.WARNING)
