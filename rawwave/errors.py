"""Expected failures: the CLI prints their message as one line on stderr and exits non-zero."""


class RawwaveError(Exception):
    """A failure the user can act on (bad file, Redis unreachable, model missing), not a bug."""

    exit_code = 1
