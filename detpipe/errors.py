"""The one exception type for mistakes a user can make; stage scripts print it as one line and exit 2."""


class DetpipeError(Exception):
    """A user-facing error whose message names the file, key or line at fault."""


def listing(items: list[str], n: int = 5) -> str:
    """The first ``n`` of ``items`` and how many more: for errors that list every problem of a kind."""
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
