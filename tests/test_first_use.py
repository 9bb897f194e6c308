"""The first ten minutes of a PyTorch user, as that user's calls: a true drop-in for
torch's function, ``from_torch`` that says what layout it returns, masks that take
tensors, a command line and help text that explain themselves."""

import inspect
import pydoc
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks
from attnkit.cli import main

sdpa = attnkit.scaled_dot_product_attention

#: torch.nn.functional.scaled_dot_product_attention's parameters, in order (torch 2.5+)
TORCH_PARAMETERS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                    "enable_gqa"]


def _qkv(Hq=4, Hkv=2, L=6, S=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, Hq, L, 8, generator=g), torch.randn(2, Hkv, S, 8, generator=g),
            torch.randn(2, Hkv, S, 8, generator=g))


# ---- 1. a drop-in for torch's function

def test_every_parameter_of_torchs_function_is_accepted_in_torchs_order():
    ours = list(inspect.signature(attnkit.scaled_dot_product_attention).parameters)
    assert ours[:len(TORCH_PARAMETERS)] == TORCH_PARAMETERS
    assert list(inspect.signature(attnkit.explain).parameters)[:8] == TORCH_PARAMETERS


def test_enable_gqa_as_torch_calls_it():
    q, k, v = _qkv()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True, enable_gqa=True), want)
    # torch's positional form, all eight arguments
    torch.testing.assert_close(sdpa(q, k, v, None, 0.0, True, None, True), want)
    # attnkit runs grouped heads with the flag off too (torch raises there)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True), want)
    assert attnkit.explain(q, k, v, enable_gqa=True).backend
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        sdpa(q, k, v, enable_gqa="yes")


def test_the_docstring_names_the_one_intended_difference():
    doc = attnkit.scaled_dot_product_attention.__doc__
    assert "drop-in" in doc and "bottom-right" in doc and "top-left" in doc


# ---- 2. from_torch keeps its promise about the layout

def test_from_torch_on_a_sequence_first_module_warns_and_matches_when_transposed():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4)  # batch_first=False, torch's default
    with pytest.warns(UserWarning, match="batch_first=False"):
        layer = attnkit.MultiHeadAttention.from_torch(mha)
    x = torch.randn(5, 3, 16)  # (L, B, E), as the module takes it
    want, _ = mha(x, x, x)
    got, _ = layer(x.transpose(0, 1))
    torch.testing.assert_close(got.transpose(0, 1), want, atol=1e-6, rtol=1e-5)
    assert "batch-first" in attnkit.MultiHeadAttention.from_torch.__doc__


def test_from_torch_on_a_batch_first_module_says_nothing():
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnkit.MultiHeadAttention.from_torch(mha)


# ---- 6. masks combine with bool tensors

def test_a_mask_combines_with_a_bool_tensor_on_either_side():
    q, k, v = _qkv(L=6, S=6)
    keep = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    dense = torch.ones(6, 6, dtype=torch.bool).tril() & keep
    want = sdpa(q, k, v, dense)
    torch.testing.assert_close(sdpa(q, k, v, masks.causal() & keep), want)
    torch.testing.assert_close(sdpa(q, k, v, keep & masks.causal()), want)
    either = torch.ones(6, 6, dtype=torch.bool).tril() | keep
    torch.testing.assert_close(sdpa(q, k, v, masks.causal() | keep), sdpa(q, k, v, either))


def test_a_float_tensor_or_a_tensor_of_the_wrong_shape_is_refused_clearly():
    with pytest.raises(TypeError, match="bool tensor"):
        masks.causal() & torch.zeros(6, 6)
    with pytest.raises(TypeError, match="bool tensor"):
        masks.causal() & [[True]]
    q, k, v = _qkv(L=6, S=6)
    with pytest.raises(ValueError, match=r"\(L, S\) = \(6, 6\)"):
        sdpa(q, k, v, masks.causal() & torch.ones(5, 6, dtype=torch.bool))


# ---- 4. the command line

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnkit {attnkit.__version__}"


def test_plot_help_lists_every_mask_with_its_parameters(capsys):
    from attnkit.viz.specs import MASK_KINDS
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    text = capsys.readouterr().out
    for name in MASK_KINDS:
        assert f"\n  {name} " in text, name
    for parameter in ("left=", "right=", "indices=", "lengths=", "sizes=", "block_size=",
                      "dilation=", "density="):
        assert parameter in text, parameter


def test_plot_titles_show_the_defaults_and_block_sparse_draws(tmp_path, capsys):
    from attnkit.viz.specs import resolve_mask_spec
    assert resolve_mask_spec("padding", 64) == "padding:lengths=48"
    assert resolve_mask_spec("sliding_window:left=3", 64) == "sliding_window:left=3,right=3"
    assert resolve_mask_spec("causal&(global|dilated)", 64) == \
        "causal&(global:indices=0|dilated:left=4,right=4,dilation=2)"
    out = tmp_path / "m.png"
    assert main(["plot", "padding", "block_sparse:block_size=8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "padding = padding:lengths=48" in printed
    assert "block_sparse:block_size=8 = block_sparse:block_size=8,density=30,seed=0" in printed
    assert out.stat().st_size > 1000


def test_plot_says_when_documents_do_not_fill_the_length(tmp_path, capsys):
    out = tmp_path / "d.png"
    assert main(["plot", "document:sizes=10+20", "--length", "64", "--out", str(out)]) == 0
    assert "document:sizes=10+20 = document:sizes=10+20+34" in capsys.readouterr().out


# ---- 5. help that maps the library

def test_help_attnkit_opens_with_a_map_and_names_the_internals():
    text = pydoc.render_doc(attnkit, renderer=pydoc.plaintext)
    head = text[:text.index("PACKAGE CONTENTS")]
    for where in ("attnkit.masks", "attnkit.bias", "attnkit.positional", "attnkit.layers",
                  "attnkit.KVCache", "attnkit.distributed", "attnkit.integrations.hf",
                  "attnkit tour", "attnkit plot", "attnkit bench"):
        assert where in head, where
    assert "Internal" in head and "attnkit.backends" in head


def test_rotary_embeddings_arguments_are_documented():
    doc = attnkit.positional.RotaryEmbedding.__doc__
    for arg in ("base", "interleaved", "rotary_dim", "head_dim"):
        assert f"{arg}:" in doc, arg
