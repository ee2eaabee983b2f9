"""The one kind of failure a user can act on: the command prints its message, with no traceback, and exits 2.

Each layer raises its own subclass (a spec, a data file, a stage, the home's servers); the message names
what failed and what to do, so nothing above needs to add to it.
"""


class LifecycleError(Exception):
    """A failure whose message tells the user what failed and how to fix it."""
