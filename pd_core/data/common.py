"""What every loader shares: the names of the splits and the error they raise.

A :class:`DatasetError` message is one line that names the file or URL and says how to fix it.
"""

from __future__ import annotations

from typing import Literal

Split = Literal["train", "test"]


class DatasetError(ValueError):
    """A dataset could not be loaded; the one-line message names the file/URL and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

