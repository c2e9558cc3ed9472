"""The one exception type users see. The CLI and the pipeline stages print it as one line."""


class CdiffError(Exception):
    """A problem with the user's input (params, paths, files, arguments), with its fix in the message."""
