"""Helpers shared by the command-line tests."""

import re


def error_line(capsys):
    """The command's stderr, checked to be one error line and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.match(r"nanoseg \w+: error: ", lines[0]), err
    return lines[0]
