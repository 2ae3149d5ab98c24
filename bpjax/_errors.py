"""The one way bpjax quotes an exception in a one-line message."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of ``error``'s message (at most ``limit`` characters), or ``""``."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ""
