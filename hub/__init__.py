"""edgefleet regional hub: fleet PKI, managed Mosquitto, device registry and ingest."""

from edgefleet import __version__

__all__ = ["__version__"]
