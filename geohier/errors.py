"""The one error family of geohier.

Every error a user can cause (a bad coordinate, a malformed cell id, a CSV without a
latitude column, a checkpoint that does not match its labels) is a ``GeohierError``
whose message names the offending value; the CLI prints it on one line and the pages
show it with ``st.error``. Anything else is a bug.
"""


class GeohierError(Exception):
    """Base class of every error geohier raises on purpose."""


class InvalidLevelError(GeohierError, ValueError):
    """A grid level is not an integer >= 1 (or exceeds the supported maximum)."""


class InvalidCoordinateError(GeohierError, ValueError):
    """A latitude or longitude is NaN, infinite or out of range."""


class CellIdError(GeohierError, ValueError):
    """A cell id string is malformed."""


class InputError(GeohierError, ValueError):
    """A user-supplied file, table or parameter cannot be used."""


class WorkspaceError(GeohierError):
    """The workspace (data/ or models/) is missing something or is inconsistent."""


class ModelError(GeohierError):
    """A backbone, a weights file or a checkpoint cannot be used."""


class ImageReadError(InputError):
    """An image file cannot be used; ``reason`` says why, one of ``geohier.images``'
    ``READ_*`` values ("missing file", "not an image", "truncated image", ...)."""

    def __init__(self, message: str, reason: str = "not an image"):
        super().__init__(message)
        self.reason = reason


class DecodeBusyError(ImageReadError):
    """Every decode slot stayed taken for the whole wait (``geohier.images.decode_slot``):
    try again."""

    def __init__(self, message: str):
        super().__init__(message, "busy")


class SplitError(WorkspaceError):
    """A run's own split cannot be used (missing, or not the one asked for)."""
