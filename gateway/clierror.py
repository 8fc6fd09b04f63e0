"""The one error type of the ``egress`` command line (its own module, so that the
class is the same object whether the CLI runs as ``egress`` or as
``python -m gateway.cli``)."""


class CliError(Exception):
    """A clear one-line error for the user; ``code`` is the exit status (2: bad input)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code
