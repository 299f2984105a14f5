"""`amole-compile`: the command line (`commands.py`), and what its commands load, train and demonstrate."""

from .commands import main, parser

__all__ = ["main", "parser"]
