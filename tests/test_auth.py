"""Bearer tokens (serving/auth.py) without a server: who may write and read, and where tokens
come from. Both servers are checked over HTTP in tests/test_serving.py."""

from __future__ import annotations

import pytest

from serving.auth import Tokens, client_token, ensure_write_token


def test_writes_need_the_write_token_and_reads_the_read_token_when_one_is_set():
    tokens = Tokens(write="w" * 20, read="r" * 20)
    assert tokens.refusal(None, write=True)[0] == 401
    assert tokens.refusal("Basic abc", write=True)[0] == 401  # another scheme is no bearer token
    assert tokens.refusal("Bearer ", write=True)[0] == 401
    assert tokens.refusal(f"Bearer {'r' * 20}", write=True)[0] == 403  # the read token writes nothing
    assert tokens.refusal(f"Bearer {'w' * 20}", write=True) is None
    assert tokens.refusal(f"bearer {'w' * 20}", write=False) is None  # the write token reads; scheme any case
    assert tokens.refusal(f"Bearer {'r' * 20}", write=False) is None
    assert tokens.refusal(f"Bearer {'r' * 19}", write=False)[0] == 403
    assert Tokens(write="w" * 20).refusal(None, write=False) is None  # no read token: reads are open
    assert Tokens().refusal(None, write=True) is None  # nothing set (an app embedded without tokens)


def test_tokens_come_from_a_file_or_the_environment_and_a_bad_source_is_named(tmp_path, monkeypatch):
    for name in ("USERREP_WRITE_TOKEN", "USERREP_WRITE_TOKEN_FILE", "USERREP_READ_TOKEN", "USERREP_READ_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "write").write_text("from-file\n")
    monkeypatch.setenv("USERREP_WRITE_TOKEN_FILE", str(tmp_path / "write"))
    monkeypatch.setenv("USERREP_READ_TOKEN", "from-env")
    assert Tokens.from_env() == Tokens(write="from-file", read="from-env")
    monkeypatch.setenv("USERREP_WRITE_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="USERREP_WRITE_TOKEN_FILE: .*no such file"):
        Tokens.from_env()
    monkeypatch.delenv("USERREP_WRITE_TOKEN_FILE")
    monkeypatch.setenv("USERREP_READ_TOKEN", "  ")
    with pytest.raises(ValueError, match="USERREP_READ_TOKEN: the token is empty"):
        Tokens.from_env()


def test_serve_makes_one_private_write_token_per_work_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("USERREP_WRITE_TOKEN", raising=False)
    monkeypatch.delenv("USERREP_WRITE_TOKEN_FILE", raising=False)
    path = ensure_write_token(tmp_path)
    token = path.read_text()
    assert len(token) >= 40 and path.stat().st_mode & 0o777 == 0o600
    assert ensure_write_token(tmp_path) == path and path.read_text() == token  # kept, never remade
    assert client_token(tmp_path) == token
    assert ensure_write_token(tmp_path / "other").read_text() != token


def test_serve_names_a_bad_token_source_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from userrep.cli import app

    (tmp_path / "batches").mkdir()
    (tmp_path / "batches" / "SERVING.json").write_text('{"serving": "b1", "history": [], "updated_at": null}')
    monkeypatch.setenv("USERREP_WRITE_TOKEN_FILE", str(tmp_path / "missing"))
    result = CliRunner().invoke(app, ["serve", "--work", str(tmp_path)])
    assert result.exit_code == 2 and "USERREP_WRITE_TOKEN_FILE" in result.output and "Traceback" not in result.output
