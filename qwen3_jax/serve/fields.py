"""Request fields that every API family shares, checked as they are parsed (a bad one is a 422)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StrictStr


def _unicode(text: str) -> str:
    """Valid JSON can hold what no UTF-8 text can (a lone surrogate, "\\ud800"): refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"holds a lone surrogate at character {error.start}: send valid Unicode") from None
    return text


def _direction(side: str) -> str:
    if side.lower() not in ("left", "right"):
        raise ValueError(f"{side!r} is not a truncation direction: choose left or right")
    return side.lower()


Text = Annotated[StrictStr, AfterValidator(_unicode)]
Direction = Annotated[StrictStr, AfterValidator(_direction)]
