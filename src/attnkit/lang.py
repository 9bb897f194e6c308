"""The language of attnkit's texts and picture labels: ``"zh"`` or ``"en"``."""

from __future__ import annotations

import locale
import os


def default_lang() -> str:
    """'zh' when the locale (LC_ALL, LC_MESSAGES or LANG, first one set) is Chinese."""
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var)
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    loc = locale.getlocale()[0] or ""
    return "zh" if loc.lower().startswith("zh") else "en"
