"""Run the whole tour: the eight sections in order, each with a numbered title."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .. import viz
from ..lang import default_lang
from .cross import section_self_cross
from .heads import section_heads
from .long import section_long
from .memory import MemoryProbe
from .padding import section_padding
from .positions import section_positions
from .qkv import section_qkv
from .seq2seq import section_seq2seq
from .session import TEXT, Tour
from .terminal import display_width, utf8_stdout
from .why import section_why

#: every picture the tour writes, by section (in English; see ``picture_name``)
PICTURES = [
    "01_why_attention.png", "02_seq2seq.png", "03_qkv_scores.png", "03_scaling.png", "04_self_cross.png",
    "05_heads.png", "05_kv_cache.png", "06_padding.png", "07_t5_buckets.png",
    "07_alibi.png", "07_rope.png", "07_transformer_xl.png", "08_sparse_masks.png",
    "08_memory.png",
]

#: (title key, section function), in the order they run
SECTIONS = [("sec_why", section_why), ("sec_seq2seq", section_seq2seq), ("sec_qkv", section_qkv),
            ("sec_cross", section_self_cross), ("sec_heads", section_heads),
            ("sec_padding", section_padding), ("sec_positions", section_positions),
            ("sec_long", section_long)]


def run(lang: str | None = None, out: str = "attnkit-tour", seed: int = 0) -> int:
    """Run the whole tour; returns the exit code (0)."""
    lang = lang or default_lang()
    if lang not in TEXT:
        raise ValueError(f"--lang must be one of {', '.join(TEXT)}, got {lang!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out!r} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    utf8_stdout()
    tour = Tour(lang, out_dir, seed)
    tour.memory = MemoryProbe()
    threads = torch.get_num_threads()
    # every tensor here is tiny: one thread avoids thread start-up and spinning, which
    # costs more than these computations
    torch.set_num_threads(1)
    try:
        return _run(tour)
    finally:
        torch.set_num_threads(threads)
        tour.memory.stop()


def _run(tour: Tour) -> int:
    """Print the header, run every section in order, then list the pictures."""
    seed, out_dir = tour.seed, tour.out
    torch.manual_seed(seed)
    print(tour.t("title"))
    tour.say("header", seed=seed, out=out_dir)
    if not viz.cjk_font_available():
        print(f"  {tour.t('no_cjk_font')}", file=sys.stderr)
    with viz.style():  # fonts that can draw Chinese, for every artist of every picture
        for i, (key, section) in enumerate(SECTIONS, 1):
            start = time.perf_counter()
            title = f"[{i}/{len(SECTIONS)}] {tour.t(key)}"
            print(f"\n{title}\n{'=' * display_width(title)}", flush=True)
            section(tour)
            print(f"  {tour.t('elapsed', s=time.perf_counter() - start)}", flush=True)
    tour.say("done", s=time.perf_counter() - tour.t0, n=len(tour.pictures), out=out_dir)
    for p in tour.pictures:
        print(f"    {p}")
    return 0
