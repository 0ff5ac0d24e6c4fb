"""Error types users see. Raised deep, turned into one line and an exit code at the CLI edge."""


class ConvError(Exception):
    """Base of every error the tool reports; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(ConvError):
    """Wrong flags or a combination of them that cannot work."""

    exit_code = 2


class BadInput(ConvError):
    """The input is missing, malformed or not what the chosen model expects."""

    exit_code = 3


class UnmappedTensor(BadInput):
    """A source tensor no rule knows, or a rule group that is incomplete."""


class VerifyMismatch(ConvError):
    """`--verify` found an output tensor that does not convert back to its input."""

    exit_code = 4


class OutputError(ConvError):
    """The output cannot be written (permissions, disk full, path clash)."""

    exit_code = 5
