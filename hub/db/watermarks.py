"""A device's cumulative acknowledgment: the watermark moves across contiguous coverage only.

Every batch covers the sequence numbers (base, last]. It is stored whatever its position;
the watermark (everything <= it is committed at the hub) advances from where it is through
the stored ranges that chain onto it. A range beyond a gap waits, kept with the watermark in
the hub database, until the gap closes: whichever hub replica stored it, the next commit of
any replica sees it. A batch marked `settled` (the first after a device's (re)connect) says
that everything up to its base was acknowledged before, or shed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# Ranges kept per device while waiting for a gap to close; a device that never closes a gap
# (its batch lost in flight) resends from its last acknowledgment anyway.
MAX_PENDING_RANGES: Final = 256


@dataclass
class Coverage:
    watermark: int
    pending: list[tuple[int, int]] = field(default_factory=list)

    def add(self, base: int, last: int, settled: bool) -> None:
        """One stored batch covering (base, last]."""
        if settled and base > self.watermark:
            self.watermark = base
        self.pending.append((base, last))
        self._advance()

    def _advance(self) -> None:
        keep: list[tuple[int, int]] = []
        for base, last in sorted(set(self.pending)):  # a batch resent beyond a gap is one range, not two
            if base <= self.watermark:
                self.watermark = max(self.watermark, last)
            else:
                keep.append((base, last))
        self.pending = keep[-MAX_PENDING_RANGES:]
