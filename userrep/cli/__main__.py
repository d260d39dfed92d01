from userrep.cli import app

app()
