"""Quick and full profiles: the same experiment at two sizes.

``quick`` (the default) runs on 2 CPU cores in minutes; CI and the rendered book execute it.
``full`` is the assignment's real setting, meant for a GPU. ``EFFICIENTML_PROFILE`` selects
the profile for a whole build; an explicit argument wins over the variable.
"""
from __future__ import annotations

import os

PROFILES = ("quick", "full")


def get_profile(profile: str | None = None) -> str:
    """Return ``profile``, else ``$EFFICIENTML_PROFILE``, else ``"quick"``; reject unknown names."""
    name = profile if profile is not None else os.environ.get("EFFICIENTML_PROFILE", "quick")
    name = name.strip().lower()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    return name
