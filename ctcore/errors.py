"""The one base of "this job cannot run as asked" errors, shared by both packages.

A `UsageError` (or a subclass: a job's own error for bad paths, settings, tables or stores) means the
input or the settings are wrong and nothing was written; every script maps it to exit status 2 with
its message. It is a ValueError, so code that catches ValueError keeps working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """The job cannot start or go on as asked (bad paths, settings, inputs): exit status 2."""
