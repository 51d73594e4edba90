"""`edge-hub`: the operator command line, one module per command group."""

from hub.cli.main import main

__all__ = ["main"]
