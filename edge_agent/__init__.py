"""edgefleet edge agent: senses, decides, buffers in SQLite and syncs over mutual-TLS MQTT."""

# A static version: importlib.metadata would cost the agent about 6 MB of RSS (P3).
from edgefleet._version import __version__

__all__ = ["__version__"]
