"""`python -m userrep.cli`: the same command as the `userrep` entry point."""

from userrep.cli import app

if __name__ == "__main__":
    app()
