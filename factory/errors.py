"""Errors that reach the user as one clear line (exit code 2 from the CLI)."""

from __future__ import annotations


class FactoryError(Exception):
    """An error caused by the user's input or environment, with the fix in its message.

    The CLI prints ``str(error)`` on one line and exits with ``exit_code``, without a traceback.
    """

    exit_code = 2


class RecipeError(FactoryError):
    """One or more problems found while validating a recipe.

    Attributes:
        problems: the problems, each printed on its own line.
    """

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        super().__init__("\n".join(p.format() for p in problems))


class Problem:
    """One problem in a recipe: where it is, what is wrong, and how to fix it."""

    def __init__(self, message: str, *, path: tuple = (), fix: str | None = None,
                 file: str | None = None, line: int | None = None):
        self.message = message
        self.path = path
        self.fix = fix
        self.file = file
        self.line = line

    @property
    def key_path(self) -> str:
        return format_path(self.path)

    def format(self) -> str:
        where = self.file or "<recipe>"
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: "
        if self.path:
            text += f"{self.key_path}: "
        text += self.message
        if self.fix:
            text += f"; {self.fix}"
        return text

    def __repr__(self) -> str:
        return f"Problem({self.format()!r})"


class ParseError(ValueError):
    """An LLM reply could not be parsed; the row is dropped with ``reason`` (``parse_error``
    unless a step names a more precise one, such as ``no_answer``), its raw reply kept."""

    def __init__(self, message: str, reason: str = "parse_error"):
        super().__init__(message)
        self.reason = reason


class BackendError(FactoryError):
    """A backend could not be reached or failed permanently (exit code 1: the recipe is fine,
    the model behind it is not)."""

    exit_code = 1


def error_lines(err: FactoryError) -> list[str]:
    """What the command line prints for an error: one ``error: ...`` line per problem."""
    if isinstance(err, RecipeError):
        return [f"error: {p.format()}" for p in err.problems]
    return [f"error: {err}"]


def format_path(path: tuple) -> str:
    """Formats ``("steps", 2, "solve", "samples")`` as ``steps[2].solve.samples``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text
