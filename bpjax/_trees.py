"""Small pytree helpers shared by the modules that name or read leaves by path."""

from typing import Any


def path_name(path: tuple) -> str:
    """A pytree key path as a name: dict keys and tuple indices joined by ``/`` ("0/2/w")."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def at_path(tree: Any, path: tuple) -> Any:
    """The subtree of ``tree`` at a key path of another tree of the same structure."""
    for entry in path:
        for attr in ("key", "idx"):
            if hasattr(entry, attr):
                tree = tree[getattr(entry, attr)]
                break
    return tree
