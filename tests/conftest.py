import pytest
import torch

from attnkit.backends import _fused


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
