"""What the writer (``persist/writer.py``) counts, and what one of its rounds read."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from persist.events import Chunk


@dataclass
class WriterStats:
    """Counters for metrics: flush lag is the age of the oldest event read but not flushed."""

    events_total: int = 0
    batches_total: int = 0
    last_batch: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=256))
    owned_buckets: int = 0
    pg_errors: int = 0
    redis_errors: int = 0
    gaps: int = 0
    quarantined: int = 0  # events set aside in event_quarantine
    oldest_unflushed_ms: int | None = None

    @property
    def flush_lag_s(self) -> float:
        if self.oldest_unflushed_ms is None:
            return 0.0
        return max(0.0, time.time() - self.oldest_unflushed_ms / 1000)


@dataclass
class RoundRead:
    """What one round read from one bucket."""

    bucket: int
    acked: bool  # whether to acknowledge up to the offset after the commit
    fresh: Chunk | None  # the entries above the offset
    full: bool
