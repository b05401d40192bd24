"""Plain-text tables and atomic JSON reports, shared by the toolkit and the runtime (standard library only)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def _ladder(v: float) -> int:
    """The decimals a value's magnitude warrants: >= 100: 0, >= 10: 1, >= 1: 2, below 1: 4 (three or four
    significant digits; four decimals keep a cosine's or a fraction's 1e-4 differences)."""
    a = abs(v)
    return 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 1 else 4


def _needed(v: float, cap: int) -> int:
    """The fewest decimals (<= ``cap``) that show ``v`` exactly: 2.9 -> 1, 7.0 -> 0; ``cap`` when none does."""
    for d in range(cap):
        if abs(round(v, d) - v) <= 1e-9 * max(1.0, abs(v)):
            return d
    return cap


def column_decimals(values) -> int | None:
    """The decimals a column's floats share: each finite float asks for :func:`_ladder`'s decimals, fewer where it
    is round (2.9 asks for 1, 7.0 for 0); the column takes the most any value asks, but at most 2 more than its
    largest value asks (one small figure does not give a column of thousands four decimals). None: no float."""
    fl = [v for v in values if isinstance(v, float) and v - v == 0]  # finite
    if not fl:
        return None
    want = max(_needed(v, _ladder(v)) for v in fl)
    return min(want, _ladder(max(abs(v) for v in fl)) + 2)


def _fixed(v: float, d: int) -> str:
    out = f"{v + 0.0:,.{d}f}"  # (+ 0.0: no "-0.0")
    if v != 0 and not out.strip("-0.,"):  # a non-zero value these decimals would show as 0: 2 significant digits
        return f"{v:.2g}"
    return out


def _fmt(v: Any, d: int | None = None) -> str:
    """One cell: a float with ``d`` decimals (None: its own :func:`column_decimals`), ints with thousands
    separators, lists joined by '-', None blank."""
    if isinstance(v, float):
        if v - v != 0:  # nan, inf
            return str(v)
        return _fixed(v, column_decimals([v]) if d is None else d)
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return "-".join(str(x) for x in v)
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None,
                 decimals: dict[str, int] | None = None, mixed: Sequence[str] = ()) -> str:
    """Render dict rows as an aligned text table (numbers right-aligned, None blank, ints with thousands
    separators). A column's floats share one number of decimals, :func:`column_decimals` of the column (so
    ``5.0, 2.9, 22.8`` print as ``5.0  2.9  22.8``, integer-valued floats without ``.0000``); a non-zero float those
    decimals would show as 0 keeps 2 significant digits; nan / inf as such. ``decimals``: a fixed number for some
    columns where the caller knows the unit (percentages: 1; degrees: 2; km: 0). ``mixed``: columns whose rows hold
    different quantities (a gates table's ``value``): each float there gets its own decimals."""
    if not rows:
        return (title + "\n" if title else "") + "(no rows)"
    columns = list(columns or rows[0].keys())
    decimals = dict(decimals or {})
    for c in columns:
        if c not in decimals and c not in mixed:
            decimals[c] = column_decimals([r.get(c) for r in rows])

    def cell(r, c):
        return _fmt(r.get(c), decimals.get(c))

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
