"""The error a user can fix; every CLI prints it as one line (llm.cli.run_cli)."""


class UserError(Exception):
    """A problem the user can fix (bad path, malformed data, impossible setting). The message names the file,
    line or field and the fix; the CLI prints it without a traceback."""
