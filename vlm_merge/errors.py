"""The one exception type users see: a one-line message naming the file/key/value and what to do."""


class VlmMergeError(Exception):
    """A problem with the user's input or environment, reported as one line (CLI: exit code 2)."""
