"""The one exception type tinymoe raises for problems a user can fix.

Every message names the thing at fault (a file, a tensor, a config field, a flag) and what was
expected, so the command line can print it as a single line and exit without a traceback.
"""


class TinyMoeError(Exception):
    """A bad path, checkpoint, config field, tensor or option; the message says which and why."""
