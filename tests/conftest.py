import re

import pytest
import torch

from attnkit.backends.chunked import fused as _fused


# ------------------------------------------------------------------ the `hf` marker

#: a test module that imports transformers (at the top, inside a test, or through
#: pytest.importorskip) checks attnkit against it
_IMPORTS_TRANSFORMERS = re.compile(
    r"^\s*(from transformers\b|import transformers\b)|importorskip\(\s*[\"']transformers",
    re.MULTILINE)


def pytest_collection_modifyitems(config, items):
    """Mark every test of a module that imports transformers as ``hf``: CI runs
    ``pytest -m hf`` again on the lowest transformers release the project supports. The
    long differential campaign (``fuzz``) runs only when asked for with ``-m fuzz``."""
    if "fuzz" not in (config.option.markexpr or ""):
        long_runs = [item for item in items if item.get_closest_marker("fuzz")]
        if long_runs:
            config.hook.pytest_deselected(items=long_runs)
            items[:] = [item for item in items if not item.get_closest_marker("fuzz")]
    facing = {}
    for item in items:
        path = item.path
        if path not in facing:
            facing[path] = bool(_IMPORTS_TRANSFORMERS.search(path.read_text(encoding="utf-8")))
        if facing[path]:
            item.add_marker(pytest.mark.hf)


def pytest_terminal_summary(terminalreporter):
    """The differential campaign's account: cases run and the slowest 5% of them."""
    import sys
    module = sys.modules.get("test_differential")
    record = getattr(module, "RECORD", None)
    if not record:
        return
    times = sorted((t for t, _ in record), reverse=True)
    n = len(times)
    slow = max(1, n // 20)
    tr = terminalreporter
    tr.write_sep("-", "differential campaign")
    tr.write_line(f"{n} cases, {sum(times):.1f} s; median {times[n // 2] * 1000:.0f} ms; "
                  f"slowest 5% ({slow} cases) from {times[slow - 1] * 1000:.0f} ms to "
                  f"{times[0] * 1000:.0f} ms, {sum(times[:slow]):.1f} s in all")
    for t, what in sorted(record, reverse=True)[:min(slow, 5)]:
        tr.write_line(f"  {t * 1000:7.0f} ms  {what}")


def pytest_report_header(config):
    try:
        import transformers
    except ImportError:
        return f"torch {torch.__version__}, transformers not installed"
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["fused", "eager"])
def kernel(request, monkeypatch):
    """Run the chunked engine with torch's fused CPU kernel and with its eager fallback."""
    if request.param == "eager":
        monkeypatch.setattr(_fused, "enabled", False)
    return request.param


def qkv(B=2, Hq=4, Hkv=2, L=9, S=9, D=8, Dv=None, dtype=torch.float32, requires_grad=False,
        batch=None):
    lead = (B,) if batch is None else tuple(batch)
    q = torch.randn(*lead, Hq, L, D, dtype=dtype)
    k = torch.randn(*lead, Hkv, S, D, dtype=dtype)
    v = torch.randn(*lead, Hkv, S, Dv or D, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


# ------------------------------------------------------------------ HF model batches

#: outputs of a model under attnkit against the model as transformers runs it
HF_TOL = dict(atol=1e-4, rtol=1e-4)


def padded_ids(batch, length, side, vocab=100, real=(None, None), last_row_full=True):
    """ids (B, L) and keep (B, L) with padding on ``side``: row r keeps ``real[r]`` tokens
    (None: length // 2 + r); rows past ``real`` (and, with ``last_row_full``, the last
    row) are not padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    keep = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(real[:batch - 1] if last_row_full else real[:batch]):
        n = n or length // 2 + row
        if side == "right":
            keep[row, n:] = 0
        else:
            keep[row, :length - n] = 0
    return ids, keep


def assert_equal_where_real(want, got, keep):
    """want/got (B, L, ...) equal at positions where keep (B, L) is 1, and finite."""
    real = keep.bool()
    torch.testing.assert_close(got[real], want[real], **HF_TOL)
    assert torch.isfinite(got).all()
