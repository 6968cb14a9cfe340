"""The one exception type for mistakes a user can make; stage scripts print it as one line and exit 2."""


class DetpipeError(Exception):
    """A user-facing error whose message names the file, key or line at fault."""
