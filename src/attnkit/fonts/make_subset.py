"""Rebuild ``attnkit-sans-cjk-sc.otf``: the subset of Noto Sans CJK SC that the pictures
need (every character of attnkit's own texts, plus ASCII, Latin-1, Greek and common
math and CJK punctuation). A maintainer's tool, not used at run time:

    apt-get install fonts-noto-cjk      # the full font, as the source
    python -m attnkit.fonts.make_subset [/path/to/NotoSansCJK-Regular.ttc]

The subset keeps Noto Sans CJK SC's outlines unchanged under the SIL Open Font License
1.1 (``OFL.txt`` beside it) and is renamed "attnkit Sans CJK SC", so it never shadows a
full installation of the original font.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent
OUTPUT = HERE / "attnkit-sans-cjk-sc.otf"
FAMILY = "attnkit Sans CJK SC"
DEFAULT_SOURCES = ["/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
                   "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf"]
#: modules whose text may end up in a picture (globs under the package folder)
TEXT_MODULES = ["tour/*.py", "viz/*.py"]

BASE = ("".join(chr(c) for c in range(0x20, 0x7F))            # ASCII
        + "".join(chr(c) for c in range(0xA0, 0x100))         # Latin-1
        + "".join(chr(c) for c in range(0x391, 0x3CA))        # Greek
        + "‘’“”"
        + "，。、；：？！（）《》【】「」『』～％＋－＝／")


#: symbols whose CJK glyphs are full-width: left out, so DejaVu Sans draws them in
#: formulas like "q·k" or "L × S" (attnkit lists DejaVu Sans right after this font)
LEFT_OUT = set("·×÷±∂√∞≤≥≈≠∑∏∈‖…—–→←↑↓")


def needed_characters() -> str:
    """Every non-ASCII character of the text modules, plus BASE, minus LEFT_OUT."""
    chars = set(BASE)
    for pattern in TEXT_MODULES:
        for path in sorted(PACKAGE.glob(pattern)):
            chars |= {c for c in path.read_text(encoding="utf-8") if ord(c) > 0x7F}
    return "".join(sorted(chars - LEFT_OUT))


def source_font(path: str | None):
    from fontTools.ttLib import TTCollection, TTFont
    candidates = [path] if path else DEFAULT_SOURCES
    for p in candidates:
        if p and Path(p).exists():
            if p.endswith(".ttc"):
                for font in TTCollection(p).fonts:
                    if font["name"].getDebugName(1) == "Noto Sans CJK SC":
                        return font
                raise SystemExit(f"{p} holds no 'Noto Sans CJK SC' face")
            return TTFont(p)
    raise SystemExit("Noto Sans CJK SC not found; apt-get install fonts-noto-cjk or give "
                     "the path to NotoSansCJK-Regular.ttc / NotoSansCJKsc-Regular.otf")


def rename(font) -> None:
    """Give the subset its own family name (OFL: a modified version is renamed)."""
    names = {1: FAMILY, 3: f"{FAMILY} subset", 4: FAMILY, 6: "attnkitSansCJKsc-Regular",
             16: FAMILY}
    table = font["name"]
    for record in list(table.names):
        if record.nameID in names:
            table.setName(names[record.nameID], record.nameID, record.platformID,
                          record.platEncID, record.langID)
    if "CFF " in font:
        cff = font["CFF "].cff
        cff.fontNames = ["attnkitSansCJKsc-Regular"]
        top = cff.topDictIndex[0]
        for key in ("FullName", "FamilyName"):
            if hasattr(top, key):
                setattr(top, key, FAMILY)


def main(argv: list[str]) -> int:
    from fontTools import subset
    font = source_font(argv[1] if len(argv) > 1 else None)
    text = needed_characters()
    opts = subset.Options()
    opts.hinting = False
    opts.layout_features = ["kern", "liga", "locl", "vert"]
    opts.drop_tables += ["VORG", "vhea", "vmtx", "DSIG"]
    opts.name_IDs = [0, 1, 2, 3, 4, 5, 6, 13, 14, 16, 17]
    sub = subset.Subsetter(opts)
    sub.populate(text=text)
    sub.subset(font)
    rename(font)
    font.recalcTimestamp = False   # same input, same bytes: no churn in the repository
    font.save(OUTPUT)
    print(f"{OUTPUT}: {len(text)} characters, {OUTPUT.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
