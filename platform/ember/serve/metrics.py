"""`/metrics`: a replica's counters in Prometheus's text format (version 0.0.4)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RequestCounts:
    """HTTP answers by path and status, counted by the request guard."""

    answers: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0

    def count(self, path: str, status: int) -> None:
        self.answers[(path, status)] += 1


def prometheus_text(requests: RequestCounts, gauges: dict[str, tuple[str, str, float]]) -> str:
    """gauges: name -> (type, help, value)."""
    lines = ["# HELP ember_requests_total HTTP requests answered, by path and status.",
             "# TYPE ember_requests_total counter"]  # fmt: skip
    for (path, status), count in sorted(requests.answers.items()):
        lines.append(f'ember_requests_total{{path="{_escape(path)}",status="{status}"}} {count}')
    for name, (kind, text, value) in gauges.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
