"""The one error type a user sees: a short line that says what to do."""


class NbCustomError(Exception):
    """A user mistake (bad SQL, a missing column, an unknown model...).

    IPython renders it through ``_render_traceback_`` as one line with no traceback; it is
    still raised, so ``nbconvert --execute`` stops on the cell.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31mNbCustomError\x1b[0m: {self}"]
