"""Errors batchscope raises on purpose.

A `UsageError` is the user's input being wrong (a value, a path, an entry point): the CLI prints
its message as one line and exits with code 2. Errors from the user's own code are never wrapped
in it, so their traceback survives.
"""

from __future__ import annotations


class BatchscopeError(Exception):
    """Base class for every error batchscope raises deliberately."""


class UsageError(BatchscopeError, ValueError):
    """Bad input: the message names the offending value and how to fix it, on one line."""


class DataNotFoundError(UsageError):
    """A dataset could not be located anywhere batchscope looks."""


class ProbeFailedError(BatchscopeError):
    """A probe could not produce a result (e.g. not even the smallest batch fits)."""
