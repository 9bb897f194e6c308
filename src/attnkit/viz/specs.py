"""Mask specs for ``attnkit plot``: parse text such as ``"sliding_window:left=4|global"``
into a mask object (see :func:`parse_mask_spec`)::

    SPEC := TERM ('|' TERM)*          '&' binds tighter than '|', as in Python;
    TERM := ATOM ('&' ATOM)*          parentheses group: (causal|global)&sliding_window
    ATOM := NAME[:key=value,...] | '(' SPEC ')'

Values are integers; a list of integers is written with ``+`` (``indices=0+31``).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from .. import masks as M


def _default_window(L: int) -> int:
    return max(1, L // 16)


def _ints(value) -> list[int]:
    return list(value) if isinstance(value, list) else [value]


def _one(value, key: str, name: str) -> int:
    if isinstance(value, list):
        raise ValueError(f"{key} takes one integer, got {'+'.join(map(str, value))}")
    return value


def _make_causal(p, L):
    return M.causal()


def _make_padding(p, L):
    return M.padding(_ints(p["lengths"]))


def _make_sliding_window(p, L):
    return M.sliding_window(_one(p["left"], "left", "sliding_window"),
                            _one(p["right"], "right", "sliding_window"))


def _make_dilated(p, L):
    d = p["dilation"]
    return M.dilated(_one(p["left"], "left", "dilated"), _one(p["right"], "right", "dilated"),
                     d if isinstance(d, list) else int(d))


def _make_chunked(p, L):
    return M.chunked(_one(p["size"], "size", "chunked"))


def _make_global(p, L):
    return M.global_tokens(_ints(p["indices"]))


def _make_bigbird(p, L):
    one = lambda k: _one(p[k], k, "bigbird")  # noqa: E731
    heads = p.get("heads")
    return M.bigbird(one("block_size"), one("window"), one("global"), one("random"),
                     one("seed"), None if heads is None else _one(heads, "heads", "bigbird"))


def _document_sizes(p, L) -> list[int]:
    sizes = _ints(p["sizes"])
    if any(s < 1 for s in sizes):
        raise ValueError(f"sizes must be >= 1, got {'+'.join(map(str, sizes))}")
    if sum(sizes) > L:
        raise ValueError(f"sizes add up to {sum(sizes)}, more than the length {L}")
    return sizes + ([L - sum(sizes)] if sum(sizes) < L else [])  # the rest: one more


def _make_document(p, L):
    sizes = _document_sizes(p, L)
    return M.document(torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)))


def _make_block_sparse(p, L):
    size = _one(p["block_size"], "block_size", "block_sparse")
    density = _one(p["density"], "density", "block_sparse")
    if size < 1:
        raise ValueError(f"block_size must be >= 1, got {size}")
    if not 0 <= density <= 100:
        raise ValueError(f"density is a percentage in [0, 100], got {density}")
    n = -(-L // size)
    g = torch.Generator().manual_seed(_one(p["seed"], "seed", "block_sparse"))
    layout = (torch.rand(n, n, generator=g) < density / 100) | torch.eye(n, dtype=torch.bool)
    return M.block_sparse(layout, size)


def _make_selected(p, L):
    """A learned selection on random inputs: every query row's top k keys (DSA), or with
    block_size every query block's top k key blocks, its own included (NSA); causal."""
    k, size = _one(p["k"], "k", "selected"), _one(p["block_size"], "block_size", "selected")
    if k < 1 or size < 0:
        raise ValueError(f"k must be >= 1 and block_size >= 0, got k={k}, block_size={size}")
    g = torch.Generator().manual_seed(_one(p["seed"], "seed", "selected"))
    n = L if size == 0 else -(-L // size)
    scores = torch.rand(n, n, generator=g).masked_fill(
        torch.ones(n, n, dtype=torch.bool).triu(1), -1.0)
    if size:
        scores = scores + 2 * torch.eye(n)  # the own block always
    top = scores.topk(min(k, n), -1)
    idx = top.indices.masked_fill(top.values < 0, -1).view(1, 1, n, -1)
    return M.selected(idx, block_size=size or None)


#: NAME -> (constructor from (params, length), the defaults of its parameters at a length
#: (every accepted key, None: not set), help text)
MASK_KINDS: dict[str, tuple[Callable, Callable, str]] = {
    "causal": (_make_causal, lambda L: {}, "query i sees keys 0..i"),
    "padding": (_make_padding, lambda L: {"lengths": L - L // 4},
                "lengths=N+N+...: keys >= lengths[b] are padding (default 3/4 of the "
                "length); several lengths = a batch, one panel each"),
    "sliding_window": (_make_sliding_window,
                       lambda L: {"left": _default_window(L), "right": None},
                       "left=, right=: keys i-left..i+right (default left=length/16, "
                       "right=left)"),
    "chunked": (_make_chunked, lambda L: {"size": max(1, L // 4)},
                "size=: Llama 4's chunks, causal inside, nothing across (default "
                "length/4)"),
    "dilated": (_make_dilated,
                lambda L: {"left": _default_window(L), "right": None, "dilation": 2},
                "left=, right=, dilation=: keys i+t*dilation, t in [-left, right] "
                "(default length/16, length/16, 2); dilation=1+2+4 gives one per head"),
    "global": (_make_global, lambda L: {"indices": 0},
               "indices=0+31: those tokens see and are seen by all (default 0)"),
    "bigbird": (_make_bigbird,
                lambda L: {"block_size": max(1, L // 16), "window": 3, "global": 2,
                           "random": 3, "seed": 0, "heads": None},
                "block_size= (default length/16), window=3, global=2, random=3, seed=0, "
                "heads= (one random draw per head)"),
    "document": (_make_document, lambda L: {"sizes": [L // 4, L // 2]},
                 "sizes=16+32: packed documents of those lengths; tokens left over form "
                 "one more (default length/4, length/2, the rest)"),
    "block_sparse": (_make_block_sparse,
                     lambda L: {"block_size": max(1, L // 8), "density": 30, "seed": 0},
                     "block_size=, density=, seed=: a random block layout, each block kept "
                     "with probability density% plus the diagonal (default length/8, 30, "
                     "0)"),
    "selected": (_make_selected, lambda L: {"k": max(1, L // 8), "block_size": 0, "seed": 0},
                 "k=, block_size=, seed=: what a learned selection keeps on random scores: "
                 "each query's top k earlier keys (DSA; default length/8), or with "
                 "block_size= each query block's top k earlier blocks, its own included "
                 "(NSA)"),
}


def _resolved(name: str, params: dict, length: int) -> dict:
    """Every parameter of ``name`` with the defaults filled in (right = left, and the
    document sizes with the leftover document)."""
    full = {**MASK_KINDS[name][1](length), **params}
    if "right" in full and full["right"] is None:
        full["right"] = full["left"]
    if name == "document":
        full["sizes"] = _document_sizes(full, length)
    return full


def _text(name: str, params: dict) -> str:
    """``name:key=value,...`` for the parameters that are set (lists joined with +)."""
    shown = [f"{k}={'+'.join(map(str, _ints(v)))}" for k, v in params.items() if v is not None]
    return name + (":" + ",".join(shown) if shown else "")


_TOKEN = re.compile(r"\s*(?:([()&|])|([^()&|\s]+))")


def _tokens(spec: str) -> list[str]:
    """Split a spec into '(', ')', '&', '|' and atoms, dropping spaces."""
    out, pos = [], 0
    spec = spec.strip()
    while pos < len(spec):
        m = _TOKEN.match(spec, pos)
        if m is None or m.end() == pos:
            break
        out.append(m.group(1) or m.group(2))
        pos = m.end()
        while pos < len(spec) and spec[pos].isspace():
            pos += 1
    return out


def _atom(text: str, length: int, spec: str) -> tuple[M.Mask, str]:
    """The mask of one ``NAME[:key=value,...]`` atom, and the atom with every parameter
    written out (defaults included)."""
    name, _, rest = text.partition(":")
    if name not in MASK_KINDS:
        raise ValueError(f"unknown mask {name!r} in {spec!r}; choose from "
                         f"{', '.join(MASK_KINDS)}")
    make, defaults, _ = MASK_KINDS[name]
    keys = tuple(defaults(length))
    params: dict[str, int | list[int]] = {}
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise ValueError(f"{name}: expected key=value, got {item!r} in {spec!r}")
            if key not in keys:
                allowed = ", ".join(keys) if keys else "no parameters"
                raise ValueError(f"{name}: unknown parameter {key!r} in {spec!r} "
                                 f"(takes {allowed})")
            if key in params:
                raise ValueError(f"{name}: {key} given twice in {spec!r}")
            try:
                nums = [int(v) for v in value.split("+")]
            except ValueError:
                raise ValueError(f"{name}: {key} must be an integer or integers joined "
                                 f"with + (like 0+31), got {value!r}") from None
            params[key] = nums if len(nums) > 1 else nums[0]
    elif text.endswith(":"):
        raise ValueError(f"{name}: nothing after ':' in {spec!r}")
    try:
        full = _resolved(name, params, length)
        return make(full, length), _text(name, full)
    except (ValueError, TypeError) as e:
        where = f"{spec!r}" if text == spec else f"{text!r} in MASK spec {spec!r}"
        raise ValueError(f"{where}: {e}") from None


def parse_mask_spec(spec: str, length: int = 64) -> M.Mask:
    """Turn ``"sliding_window:left=4|global:indices=0+31"`` into a mask object.

    Grammar (``&`` binds tighter than ``|``; parentheses group)::

        SPEC := TERM ('|' TERM)* ;  TERM := ATOM ('&' ATOM)* ;
        ATOM := NAME[:key=value,...] | '(' SPEC ')'

    ``length`` sets the defaults that scale with it (window sizes, block size, padding
    and document lengths). Raises ValueError with a one-line message on a bad spec.
    """
    return _parse(spec, length)[0]


def resolve_mask_spec(spec: str, length: int = 64) -> str:
    """The spec with every parameter written out, defaults included, as ``attnkit plot``
    titles its panels: ``resolve_mask_spec("padding", 64) == "padding:lengths=48"``."""
    return _parse(spec, length)[1]


def _parse(spec: str, length: int) -> tuple[M.Mask, str]:
    """(mask, resolved text) of a spec: the recursive-descent parser behind
    :func:`parse_mask_spec` and :func:`resolve_mask_spec`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty MASK spec; expected NAME[:key=value,...] with NAME one of "
                         + ", ".join(MASK_KINDS))
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"--length must be a positive integer, got {length!r}")
    toks = _tokens(spec)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def expr():
        m, t = term()
        while peek() == "|":
            take()
            m2, t2 = term()
            m, t = m | m2, f"{t}|{t2}"
        return m, t

    def term():
        m, t = atom()
        while peek() == "&":
            take()
            m2, t2 = atom()
            m, t = m & m2, f"{t}&{t2}"
        return m, t

    def atom():
        tok = peek()
        if tok is None:
            raise ValueError(f"MASK spec {spec!r} ends where a mask name was expected")
        if tok in "&|)":
            raise ValueError(f"unexpected {tok!r} in MASK spec {spec!r}; expected a mask "
                             f"name or '('")
        take()
        if tok == "(":
            m, t = expr()
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in MASK spec {spec!r}")
            take()
            return m, f"({t})"
        return _atom(tok, length, spec)

    mask = expr()
    if pos != len(toks):
        if toks[pos] == ")":
            raise ValueError(f"unbalanced parentheses in MASK spec {spec!r}")
        raise ValueError(f"unexpected {toks[pos]!r} in MASK spec {spec!r}; join masks "
                         f"with & or |")
    return mask

