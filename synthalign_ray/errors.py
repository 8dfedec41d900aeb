"""The one base class for mistakes a user can fix (a bad config field, a missing file, an output held by
another run). Every such error derives from `UserError`; the CLI catches it in one place and prints its
message as one `error:` line with exit status 2, never a traceback. Anything else is a bug and keeps
its traceback."""


class UserError(Exception):
    """A mistake in what the user asked for; its message names the bad field, line or path."""
