"""Words every message shares: a list capped to its first few items, the rest counted ("and 3 more").

The bottom of the package: imports none of it (and no torch, so the CLI's input checks stay light).
"""

from __future__ import annotations

from collections.abc import Sequence

#: How many items a message names before it counts the rest; a message that must show more (or fewer) says so.
LIMIT = 6


def listed(items: Sequence[str], *, limit: int = LIMIT, sep: str = ", ") -> str:
    """The first `limit` items joined by `sep` for a sentence, then " and K more" for the rest."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def listed_lines(items: Sequence[str], *, limit: int = LIMIT) -> list[str]:
    """The first `limit` items, one a line, then a line "... and K more" for the rest."""
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return [*items[:limit], *more]
