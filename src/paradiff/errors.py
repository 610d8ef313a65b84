"""One exception type for user mistakes, so the CLI can print one clear line instead of a traceback."""


class UserError(Exception):
    """A problem with what the user asked for (bad size, unknown model, too many ranks...).

    The message is a complete sentence that says what is wrong and, where possible, what would work.
    """


class CollectiveError(UserError):
    """A collective failed or timed out: ranks made different calls, or one died. The message names the cause."""
