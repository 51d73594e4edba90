"""edgefleet edge agent: senses, decides, buffers in SQLite and syncs over mutual-TLS MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
