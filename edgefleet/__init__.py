"""edgefleet's shared layer: the wire protocol, the policy language, the MQTT session and the
runtime helpers both daemons use. It imports neither `edge_agent` nor `hub`."""

# A static version: importlib.metadata would cost the agent about 6 MB of RSS (P3).
from edgefleet._version import __version__

__all__ = ["__version__"]
