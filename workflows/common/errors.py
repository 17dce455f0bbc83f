"""Errors a user can fix, and the exit codes every command shares (README documents them)."""

EXIT_OK = 0
EXIT_FAILED = 1  # the work ran and failed: a submitted job, a Kubernetes job, a model version's eval
EXIT_USER_ERROR = 2  # a problem to fix before the work can run (config, input, an unreachable service)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT


class UserError(Exception):
    """Bad input, bad config, unreachable service: the message says what to do."""
