"""Plain-text tables and atomic JSON reports, shared by the toolkit and the runtime (standard library only)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5 or (abs(v) < 1e-3 and v != 0):
            return f"{v:.3g}"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return "-".join(str(x) for x in v)
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None,
                 decimals: dict[str, int] | None = None) -> str:
    """Render dict rows as an aligned text table (numbers right-aligned). ``decimals``: a fixed number of decimals
    for some columns (percentages: 1), instead of the default significant-digit rule."""
    if not rows:
        return (title + "\n" if title else "") + "(no rows)"
    columns = list(columns or rows[0].keys())
    decimals = decimals or {}

    def cell(r, c):
        v = r.get(c)
        if c in decimals and isinstance(v, float) and v == v:
            return f"{v:,.{decimals[c]}f}"
        return _fmt(v)

    cells = [[cell(r, c) for c in columns] for r in rows]
    # a column is numeric (right-aligned) when every value it has is a number; None cells are blank
    numeric = [any(r.get(c) is not None for r in rows) and
               all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows
                   if r.get(c) is not None) for c in columns]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(columns), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_json(path, obj: Any) -> Path:
    """Write JSON atomically (temp file in the same folder + rename; the user's umask applies)."""
    from .fsutil import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
    return path
