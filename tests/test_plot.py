"""attnkit plot: mask specs parse into the right masks (checked against dense patterns
built here from their definitions), every kind draws, and bad arguments exit with code 2
and one line, never a traceback."""

import subprocess
import sys

import pytest
import torch

from attnkit import masks as M
from attnkit.cli import main
from attnkit.viz import MASK_KINDS, parse_mask_spec
from attnkit.viz.plot import _panels

L = 32
i = torch.arange(L).view(-1, 1)
j = torch.arange(L).view(1, -1)


def dense(spec, length=L):
    return parse_mask_spec(spec, length).materialize(length, length)


# --------------------------------------------------------------------------- parsing

def test_every_kind_matches_its_definition():
    assert torch.equal(dense("causal"), j <= i)
    assert torch.equal(dense("sliding_window:left=3,right=1"), (j >= i - 3) & (j <= i + 1))
    assert torch.equal(dense("sliding_window:left=2"), (i - j).abs() <= 2)   # right = left
    rel = j - i
    want = (rel % 3 == 0) & (rel >= -2 * 3) & (rel <= 1 * 3)
    assert torch.equal(dense("dilated:left=2,right=1,dilation=3"), want)
    g = torch.zeros(L, dtype=torch.bool)
    g[[0, 7]] = True
    assert torch.equal(dense("global:indices=0+7"), g[:, None] | g[None, :])
    pad = dense("padding:lengths=20+9")
    assert pad.shape == (2, 1, L, L)
    assert torch.equal(pad[0, 0], (j < 20).expand(L, L))
    assert torch.equal(pad[1, 0], (j < 9).expand(L, L))
    ids = torch.tensor([0] * 5 + [1] * 10 + [2] * (L - 15))
    assert torch.equal(dense("document:sizes=5+10"), ids[:, None] == ids[None, :])
    bb = M.bigbird(4, 3, 2, 1, seed=5).materialize(L, L)
    assert torch.equal(dense("bigbird:block_size=4,window=3,global=2,random=1,seed=5"), bb)
    assert dense("bigbird:block_size=4,heads=3").shape == (1, 3, L, L)
    top = dense("selected:k=5").view(L, L)  # each row its top 5 earlier keys
    assert not (top & (j > i)).any()
    assert top.sum(-1).tolist() == [min(5, r + 1) for r in range(L)]
    blocks = dense("selected:k=2,block_size=4").view(L, L)  # 2 key blocks per query block
    per_block = blocks.view(L // 4, 4, L // 4, 4)[:, 0, :, 0]
    assert per_block.sum(-1).tolist() == [min(2, b + 1) for b in range(L // 4)]
    assert per_block.diagonal().all() and not per_block.triu(1).any()


def test_defaults_scale_with_length():
    for n in (16, 64, 256):
        w = max(1, n // 16)
        ii, jj = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
        assert torch.equal(dense("sliding_window", n), (ii - jj).abs() <= w)
        assert torch.equal(dense("padding", n)[0, 0], (jj < n - n // 4).expand(n, n))
        assert torch.equal(dense("global", n), (ii == 0) | (jj == 0))
        assert torch.equal(dense("bigbird", n), M.bigbird(max(1, n // 16)).materialize(n, n))
        doc = dense("document", n)
        assert doc[0, 0] and not doc[0, n - 1] and doc.diagonal().all()


def test_and_binds_tighter_than_or_and_parentheses_group():
    c, g, s = dense("causal"), dense("global:indices=0"), dense("sliding_window:left=1")
    assert torch.equal(dense("causal|global:indices=0&sliding_window:left=1"), c | (g & s))
    assert torch.equal(dense("global:indices=0&sliding_window:left=1|causal"), (g & s) | c)
    assert torch.equal(dense("(causal|global:indices=0)&sliding_window:left=1"), (c | g) & s)
    assert torch.equal(dense(" causal & sliding_window:left=1 "), c & s)   # spaces are fine
    # mixing a batch-dependent mask with others broadcasts
    mixed = dense("padding:lengths=10+20&causal")
    assert mixed.shape == (2, 1, L, L)
    assert torch.equal(mixed[1, 0], c & (j < 20))


def test_batch_and_head_masks_get_one_panel_each():
    assert len(_panels(parse_mask_spec("causal", L), L, "causal", "en")) == 1
    assert len(_panels(parse_mask_spec("padding:lengths=3+4+5", L), L, "p", "en")) == 3
    assert len(_panels(parse_mask_spec("dilated:dilation=1+2", L), L, "d", "en")) == 2
    panels = _panels(parse_mask_spec("bigbird:block_size=4,heads=6", L), L, "b", "zh")
    assert len(panels) == 4 and "共 6 个" in panels[-1][0]


BAD = [
    ("", "empty"),
    ("foo", "unknown mask 'foo'"),
    ("causal&", "ends where a mask name was expected"),
    ("|causal", "unexpected '|'"),
    ("causal causal", "join masks with & or |"),
    ("(causal", "unbalanced parentheses"),
    ("causal)", "unbalanced parentheses"),
    ("causal:x=1", "unknown parameter 'x'"),
    ("causal:", "nothing after ':'"),
    ("sliding_window:left", "expected key=value"),
    ("sliding_window:left=a", "must be an integer"),
    ("sliding_window:left=1+2", "takes one integer"),
    ("dilated:left=-1", "must be >= 0"),
    ("sliding_window:left=1,left=2", "given twice"),
    ("dilated:dilation=0", "dilation must be >= 1"),
    ("bigbird:window=2", "must be odd"),
    ("document:sizes=30+30", "more than the length"),
    ("padding:lengths=-3", "lengths must be"),
]


@pytest.mark.parametrize("spec,message", BAD)
def test_bad_specs_raise_one_line_value_errors(spec, message):
    with pytest.raises(ValueError, match=None) as e:
        parse_mask_spec(spec, L).materialize(L, L)
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- command

def _png_ok(path, min_width=500):
    import matplotlib.image as mpimg
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)[..., :3]
    assert img.shape[1] >= min_width and img.std() > 0.05
    return img


def test_plot_every_kind_and_compositions(tmp_path, capsys):
    out = tmp_path / "sub" / "masks.png"          # the folder is created
    specs = list(MASK_KINDS) + ["sliding_window:left=3&causal|global:indices=0+31",
                                "(causal|global)&dilated:dilation=2"]
    assert main(["plot", *specs, "--length", "48", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    img = _png_ok(out)
    single = tmp_path / "one.png"
    assert main(["plot", "causal", "--out", str(single)]) == 0
    one = _png_ok(single, min_width=300)
    assert img.shape[0] > one.shape[0] and img.shape[1] > one.shape[1]   # a grid of panels


def test_plot_in_chinese(tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("LC_ALL", "zh_CN.UTF-8")
    out = tmp_path / "zh.png"
    assert main(["plot", "bigbird:heads=2", "padding:lengths=40+64", "--out", str(out)]) == 0
    _png_ok(out)
    assert not [w for w in recwarn if "missing from font" in str(w.message)]


@pytest.mark.parametrize("argv", [
    ["plot", "foo", "--out", "x.png"],
    ["plot", "sliding_window:left=q", "--out", "x.png"],
    ["plot", "global:indices=99", "--length", "16", "--out", "x.png"],
    ["plot", "causal", "--length", "0", "--out", "x.png"],
    ["plot", "causal", "--length", "100000", "--out", "x.png"],
    ["plot", "causal", "--out", "x.txt"],
    ["plot", "causal", "--length", "ten", "--out", "x.png"],
    ["plot", "causal"],
    ["plot", "--out", "x.png"],
])
def test_bad_arguments_exit_2_with_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnkit: error:") and "\n" not in err
    assert not (tmp_path / "x.png").exists()


def test_bad_spec_in_a_real_process(tmp_path):
    p = subprocess.run([sys.executable, "-m", "attnkit.cli", "plot", "causal&&causal", "--out",
                        str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error:") and "'&'" in lines[0]
