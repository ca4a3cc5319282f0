"""Suite-wide settings: no Ray usage reporting, one torch thread per process (2-core machines)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
