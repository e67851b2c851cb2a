"""The one exception type users see.

Every problem caused by input (config, data files, paths, task names) is raised as a
`MultituneError` whose message is one line naming the file, line and field. The CLI prints it
without a traceback; anything else escaping is a bug in multitune.
"""


class MultituneError(Exception):
    """A user-facing error: its message is the whole explanation, on one line."""
