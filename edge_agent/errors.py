"""The agent's exception root: the shared layer's (edgefleet.errors), under the agent's name."""

from __future__ import annotations

from edgefleet.errors import EdgefleetError

# One root for both, so that `except AgentError` in the agent also catches what the shared layer
# raises (a refused publish, a bad config), as it did before the shared layer was split out.
AgentError = EdgefleetError

__all__ = ["AgentError"]
