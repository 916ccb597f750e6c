"""Skip-and-count bookkeeping for streaming readers.

A long indexing or training run must not die on one corrupt JPEG, but it must not lose data silently
either. Streaming readers record every skipped sample here (with the reason and where it came from);
the report is printed at the end of the run and can be asserted on in tests.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class FaultReport:
    """Counts of skipped samples by reason, with the first few locations kept for each reason."""

    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        """Record that the sample at ``where`` (a file, shard#key, ...) was skipped for ``reason``."""
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(where)
        logger.warning("skipped %s: %s", where, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: FaultReport) -> None:
        """Fold another report (e.g. from a worker process) into this one."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            kept = self.examples.setdefault(reason, [])
            kept.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(kept))])

    def summary(self) -> str:
        """One human-readable paragraph: what was skipped, how often, and where."""
        if not self.counts:
            return "no samples skipped"
        lines = [f"skipped {self.total} sample(s):"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n} x {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"total": self.total, "counts": dict(self.counts), "examples": self.examples}
