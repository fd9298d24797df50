"""What happened to each zip of a download run (one `Result` per zip, filled by fetch and extract) and
the summary table printed at the end, so a user sees at a glance what was resumed, verified or failed."""
from __future__ import annotations

from dataclasses import dataclass, field

from src.disk_space import human


@dataclass
class Result:
    """What happened to one zip in this run (one row of the summary table)."""

    name: str
    status: str = "pending"    # ok | skipped | failed
    size: int = 0              # bytes of the zip (0 when unknown)
    fetched: int = 0           # bytes received in this run
    resumed_from: int = 0      # bytes already in the .part file when this run started
    seconds: float = 0.0
    md5: str = "-"             # ok | unknown | mismatch | -
    extracted: str = "-"       # yes | already | failed | -
    message: str = ""
    entries: list[str] = field(default_factory=list)


def summary(results: list[Result]) -> str:
    """Plain-text table, one row per zip."""
    head = ("file", "status", "size", "fetched", "resumed", "time", "speed", "md5", "extract")
    rows = [head]
    for r in results:
        speed = human(r.fetched / r.seconds) + "/s" if r.fetched and r.seconds > 0 else "-"
        rows.append((r.name, r.status, human(r.size) if r.size else "-",
                     human(r.fetched) if r.fetched else "-", human(r.resumed_from) if r.resumed_from else "-",
                     f"{r.seconds:.1f} s" if r.seconds else "-", speed, r.md5, r.extracted))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [r.message if r.message.startswith(r.name) else f"{r.name}: {r.message}"
              for r in results if r.message]
    return "\n".join(lines)
