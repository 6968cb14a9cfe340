"""The one exception type for mistakes a user can make (stage scripts print it as one line and exit 2), and the
termination that SIGTERM asks for (stage scripts then remove their temporary output and exit 130)."""

_terminated = False


class DetpipeError(Exception):
    """A user-facing error whose message names the file, key or line at fault."""


def listing(items: list[str], n: int = 5) -> str:
    """The first ``n`` of ``items`` and how many more: for errors that list every problem of a kind."""
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def terminate(signum=None, frame=None) -> None:
    """SIGTERM's handler (detpipe.cli): unwind like Ctrl-C. It also leaves a mark: where the KeyboardInterrupt is
    lost, raised inside a finaliser (Python reports and ignores those), :func:`check_terminated` raises it again
    at the loops' next step and before any output is put in place (detpipe.files)."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def check_terminated() -> None:
    """Raise KeyboardInterrupt if SIGTERM arrived: called by the training, prediction and inference loops at each
    step, and before an output replaces its destination."""
    if _terminated:
        raise KeyboardInterrupt


def reset_terminated() -> None:
    """Forget a SIGTERM (detpipe.cli, when a stage run called in-process has ended)."""
    global _terminated
    _terminated = False
