"""User-facing errors: one line, exit status 2, no traceback."""

import difflib


class CompressError(Exception):
    """A problem with the user's input (recipe, data, checkpoint, CLI); exit status 2."""

    exit_code = 2


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and the first non-blank line of its message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


def did_you_mean(name, valid):
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(what, name, valid):
    """Message for a name that is not one of `valid`."""
    valid = sorted(str(v) for v in valid)
    shown = str(name) if len(str(name)) <= 60 else str(name)[:57] + "..."
    return f"unknown {what} '{shown}'{did_you_mean(name, valid)}; valid: {', '.join(valid) or '(none defined)'}"
