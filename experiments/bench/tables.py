"""Text-table helpers shared by the report modules."""


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as lines of left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted, or ``n/a`` where it was not measured."""
    return "n/a" if x is None else format(x, spec)


def mb(n_bytes: int | None) -> float | None:
    """Bytes in MB (2**20 bytes); None stays None."""
    return None if n_bytes is None else n_bytes / 2**20
