"""Quantized nn modules (Linear4bit, Linear8bit) and quantize_model.

The oracle is the pure-torch reference (``inductor_quant.reference``): a layer's weight must be
exactly the reference dequantization of the reference quantization of the weight it was given
(double quantization included), and its output exactly ``F.linear`` with that weight on CPU.
"""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inductor_quant.code_tables import dynamic_map, get_4bit_code
from inductor_quant.nn import Linear4bit, Linear8bit, LinearFP4, LinearNF4, QuantizationReport, name_matches, quantize_model
from inductor_quant.reference import blockwise as ref_blockwise
from inductor_quant.reference import fourbit as ref_fourbit


def reference_4bit_weight(W: torch.Tensor, quant_type: str, blocksize: int, nested: bool) -> torch.Tensor:
    """Dequantized weight computed with the reference only (independent of the module code)."""
    packed, absmax = ref_fourbit.quantize_4bit(W, blocksize, quant_type, torch.uint8)
    if nested:
        offset = absmax.mean()
        q, nested_absmax = ref_blockwise.quantize_blockwise(absmax - offset, dynamic_map(), 256)
        absmax = ref_fourbit.resolve_absmax(nested_absmax, q, dynamic_map(), offset)
    return ref_fourbit.dequantize_4bit(packed, absmax, blocksize, quant_type, W.shape, W.dtype)


def make_linear4bit(W: torch.Tensor, bias: torch.Tensor | None, **kwargs) -> Linear4bit:
    linear = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, dtype=W.dtype)
    with torch.no_grad():
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias)
    return Linear4bit.from_linear(linear, **kwargs)


@pytest.mark.parametrize(
    "quant_type,nested,blocksize,storage",
    [
        ("nf4", True, 64, torch.uint8),
        ("nf4", False, 128, torch.uint8),
        ("fp4", True, 32, torch.bfloat16),
        ("fp4", False, 64, torch.float32),
        ("nf4", True, 256, torch.float16),
    ],
)
def test_linear4bit_matches_reference(quant_type, nested, blocksize, storage):
    # K = 200 is not a multiple of the blocksize: blocks cross rows, the last one is partial.
    W = torch.randn(48, 200)
    bias = torch.randn(48)
    layer = make_linear4bit(
        W, bias, quant_type=quant_type, compress_statistics=nested, blocksize=blocksize, quant_storage=storage
    )
    assert layer.weight.dtype == storage and not layer.weight.requires_grad
    assert layer.weight.shape == (48 * 200 // (2 * storage.itemsize), 1)
    assert layer.nested is nested
    expected_W = reference_4bit_weight(W, quant_type, blocksize, nested)
    torch.testing.assert_close(layer.dequantize_weight(), expected_W, rtol=0, atol=0)
    # quantization error is that of 4-bit blockwise (bitsandbytes' bound for nf4 / fp4 at bs <= 256)
    assert (expected_W - W).abs().mean() < (0.115 if quant_type == "nf4" else 0.16)
    x = torch.randn(2, 3, 200)
    torch.testing.assert_close(layer(x), F.linear(x, expected_W, bias), rtol=0, atol=0)
    # and against float64 math
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), expected_W.double(), bias.double()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype,compute_dtype", [(torch.bfloat16, None), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_linear4bit_dtypes(dtype, compute_dtype):
    W = torch.randn(32, 64)
    layer = make_linear4bit(W, torch.randn(32), quant_type="nf4", compute_dtype=compute_dtype)
    x = torch.randn(4, 64, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    cdt = compute_dtype or dtype
    expected = F.linear(x.to(cdt), layer.dequantize_weight(cdt), layer.bias.to(cdt)).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_aliases_and_defaults():
    assert LinearNF4(64, 32).quant_type == "nf4"
    assert LinearFP4(64, 32).quant_type == "fp4"
    layer = Linear4bit(64, 32)
    assert (layer.quant_type, layer.blocksize, layer.compress_statistics, layer.quant_storage) == ("fp4", 64, True, torch.uint8)
    # usable at once: initialized like nn.Linear, then quantized
    W = layer.dequantize_weight()
    assert W.abs().max() <= 1 / 8 + 1e-6 and W.std() > 0.02
    no_bias = Linear4bit(64, 32, bias=False)
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()


def test_state_dict_layout_is_bitsandbytes():
    layer = make_linear4bit(torch.randn(128, 256), torch.randn(128), quant_type="nf4", compress_statistics=True)
    sd = layer.state_dict()
    expected = {
        "weight": ((16384, 1), torch.uint8),
        "bias": ((128,), torch.float32),
        "weight.absmax": ((512,), torch.uint8),
        "weight.quant_map": ((16,), torch.float32),
        "weight.nested_absmax": ((2,), torch.float32),
        "weight.nested_quant_map": ((256,), torch.float32),
    }
    blob_key = "weight.quant_state.bitsandbytes__nf4"
    assert list(sd) == ["weight", "bias", *[k for k in expected if k.startswith("weight.")], blob_key]
    for key, (shape, dtype) in expected.items():
        assert (tuple(sd[key].shape), sd[key].dtype) == (shape, dtype), key
    meta = json.loads(bytes(sd[blob_key].tolist()).decode())
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "float32"
    assert meta["shape"] == [128, 256] and meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"
    assert meta["nested_offset"] == pytest.approx(float(layer.offset))
    torch.testing.assert_close(sd["weight.quant_map"], get_4bit_code("nf4"), rtol=0, atol=0)
    plain = make_linear4bit(torch.randn(64, 64), None, quant_type="fp4", compress_statistics=False).state_dict()
    assert list(plain) == ["weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__fp4"]
    assert plain["weight.absmax"].dtype == torch.float32


def test_module_dtype_cast_keeps_packed_bytes_and_scales():
    layer = make_linear4bit(torch.randn(32, 64), torch.randn(32), quant_type="nf4", quant_storage=torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    after = layer.state_dict()
    assert after["bias"].dtype == torch.float16
    for key in before:
        if key != "bias":
            same = after[key].dtype == before[key].dtype and torch.equal(after[key].view(torch.uint8), before[key].view(torch.uint8))
            assert same, key
    x = torch.randn(3, 64, dtype=torch.float16)
    expected = F.linear(x, layer.dequantize_weight(torch.float16), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_set_weight_and_meta_construction():
    W = torch.randn(40, 96)
    meta = Linear4bit(96, 40, quant_type="nf4", device="meta")
    assert meta.weight.is_meta and meta.absmax.is_meta and meta.weight.shape == (40 * 96 // 2, 1)
    assert meta.absmax.shape == (40 * 96 // 64,) and meta.nested_absmax.shape == (1,)
    layer = Linear4bit(96, 40, quant_type="nf4")
    layer.set_weight(W)
    torch.testing.assert_close(layer.dequantize_weight(), reference_4bit_weight(W, "nf4", 64, True), rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight must have shape"):
        layer.set_weight(W.t())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"quant_type": "int4"}, "quant_type"),
        ({"blocksize": 48}, "blocksize"),
        ({"blocksize": 8192}, "blocksize"),
        ({"quant_storage": torch.int32}, "quant_storage"),
        ({"compute_dtype": torch.float64}, "compute_dtype"),
    ],
)
def test_linear4bit_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Linear4bit(64, 32, **kwargs)


def test_quant_storage_must_divide():
    with pytest.raises(ValueError, match="quant_storage=torch.float32 needs in_features"):
        Linear4bit(3, 5, quant_storage=torch.float32)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        Linear4bit(0, 5)


def _graph_targets(fn, *args):
    """Targets of the FX graph dynamo captures (fullgraph), and the compiled result."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target).removesuffix(".default") for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return targets, out


@pytest.mark.parametrize("nested", [True, False])
def test_compiled_forward_is_dequantize_plus_linear(nested):
    torch._dynamo.reset()
    layer = make_linear4bit(torch.randn(64, 128), torch.randn(64), quant_type="nf4", compress_statistics=nested)
    x = torch.randn(5, 128)
    targets, out = _graph_targets(layer, x)
    assert "inductor_quant.dequantize_4bit" in targets
    assert ("inductor_quant.dequantize_blockwise" in targets) is nested
    assert not any("gemm_4bit" in t for t in targets)
    assert any("linear" in t for t in targets)
    eager = layer(x)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_eager_forward_calls_gemm_4bit(monkeypatch):
    layer = make_linear4bit(torch.randn(32, 64), None, quant_type="fp4")
    calls = []
    original = torch.ops.inductor_quant.gemm_4bit

    class Spy:
        def __call__(self, *args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

    monkeypatch.setattr(torch.ops.inductor_quant, "gemm_4bit", Spy())
    layer(torch.randn(2, 64))
    assert len(calls) == 1 and calls[0][1] is layer.weight


def test_linear8bit_matches_reference_and_beats_4bit():
    W = torch.randn(64, 300)
    bias = torch.randn(64)
    linear = nn.Linear(300, 64)
    with torch.no_grad():
        linear.weight.copy_(W)
        linear.bias.copy_(bias)
    layer = Linear8bit.from_linear(linear)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (64, 300) and layer.blocksize == 256
    codes, absmax = ref_blockwise.quantize_blockwise(W, dynamic_map(), 256)
    expected_W = ref_blockwise.dequantize_blockwise(codes, absmax, dynamic_map(), 256, torch.float32)
    torch.testing.assert_close(layer.dequantize_weight(), expected_W, rtol=0, atol=0)
    x = torch.randn(3, 300)
    torch.testing.assert_close(layer(x), F.linear(x, expected_W, bias), rtol=0, atol=0)
    err8 = (expected_W - W).abs().mean()
    err4 = (reference_4bit_weight(W, "nf4", 64, False) - W).abs().mean()
    assert err8 < 0.011 * W.abs().max() and err8 < err4 / 3
    torch._dynamo.reset()
    targets, out = _graph_targets(layer, x)
    assert "inductor_quant.dequantize_blockwise" in targets
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    # gradient flows to the input and the bias only
    x.requires_grad_(True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, expected_W.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is not None and layer.weight.grad is None


def test_linear8bit_state_dict_roundtrip():
    layer = Linear8bit(96, 40, blocksize=64)
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.inductor_quant__blockwise8"]
    other = Linear8bit(96, 40, device="meta")
    other.load_state_dict(sd)
    assert other.blocksize == 64 and not other.weight.is_meta and not other.bias.is_meta
    x = torch.randn(2, 96)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    fp = nn.Linear(96, 40)
    other.load_state_dict(fp.state_dict())
    assert other.weight.dtype == torch.uint8
    torch.testing.assert_close(other(x), fp(x), rtol=0.05, atol=0.05)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(self.q_proj(h), h, self.v_proj(h))[0]


class Toy(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_name_matches():
    assert name_matches("lm_head", ["lm_head"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["layers.0.*"])
    assert name_matches("model.layers.10.mlp.up_proj", ["*.mlp.*"])
    assert not name_matches("model.layers.0.self_attn.q_proj", ["k_proj", "layers.1.*"])
    assert not name_matches("model.lm_head_extra", ["lm_head"])


def test_quantize_model_replaces_linears_in_place():
    model = Toy().eval()
    ids = torch.randint(0, 50, (2, 7))
    reference = model(ids)
    original_q = model.layers[0].q_proj
    report = quantize_model(model, quant_type="nf4", skip=("lm_head", "layers.1.v_proj"))
    assert isinstance(report, QuantizationReport)
    assert report.quantized == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"]
    assert sorted(report.skipped) == ["layers.1.v_proj", "lm_head"]
    assert type(model.lm_head) is nn.Linear and type(model.layers[1].v_proj) is nn.Linear
    # MultiheadAttention's out_proj is a Linear subclass MHA reads directly: left alone
    assert type(model.layers[0].attn.out_proj) is not Linear4bit
    q = model.layers[0].q_proj
    assert isinstance(q, Linear4bit) and q.bias is original_q.bias and not q.training
    torch.testing.assert_close(
        q.dequantize_weight(), reference_4bit_weight(original_q.weight.detach(), "nf4", 64, True), rtol=0, atol=0
    )
    new_bytes = sum(
        t.numel() * t.element_size()
        for name in report.quantized
        for t in [model.get_submodule(name).weight, *model.get_submodule(name).buffers()]
    )
    assert report.bytes_before - report.bytes_after == 3 * 64 * 64 * 4 - new_bytes
    assert report.bytes_after < report.bytes_before and "3 linear layers" in str(report)
    out = model(ids)
    assert out.shape == reference.shape and (out - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_quantize_model_8bit_and_shared_layers():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = quantize_model(model, bits=8)
    assert report.quantized == ["0"] and isinstance(model[0], Linear8bit) and model[0] is model[2]
    assert model[0].blocksize == 256
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), bits=3)
    with pytest.raises(ValueError, match="0: quant_storage=torch.float32 needs"):
        quantize_model(nn.Sequential(nn.Linear(3, 5)), quant_storage=torch.float32)
    with pytest.raises(ValueError, match="0: weight dtype torch.float64"):
        quantize_model(nn.Sequential(nn.Linear(4, 4, dtype=torch.float64)))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_model_on_meta_then_load(bits):
    full = Toy().eval()
    checkpoint = full.state_dict()
    expected = Toy().eval()
    quantize_model(expected, bits=bits)
    expected.load_state_dict(checkpoint)

    with torch.device("meta"):
        model = Toy().eval()
    report = quantize_model(model, bits=bits)
    assert model.layers[0].q_proj.weight.is_meta
    assert report.bytes_after < report.bytes_before
    # a full-precision checkpoint: quantized as it is loaded
    model.load_state_dict(checkpoint, assign=True)
    ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(model(ids), expected(ids), rtol=0, atol=0)
    # a quantized checkpoint: adopted as stored
    with torch.device("meta"):
        again = Toy().eval()
    quantize_model(again, bits=bits)
    again.load_state_dict(expected.state_dict(), assign=True)
    torch.testing.assert_close(again(ids), expected(ids), rtol=0, atol=0)


@pytest.mark.parametrize("have_tqdm", [True, False])
def test_progress_bar(capsys, monkeypatch, have_tqdm):
    if not have_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    else:
        pytest.importorskip("tqdm")
    quantize_model(Toy(), progress=True)
    err = capsys.readouterr().err
    assert "quantizing" in err and "4/4" in err


def test_all_quant_types_forward_backward():
    for quant_type, nested in itertools.product(["nf4", "fp4"], [True, False]):
        layer = make_linear4bit(torch.randn(16, 64), torch.randn(16), quant_type=quant_type, compress_statistics=nested)
        x = torch.randn(3, 64, requires_grad=True)
        layer(x).square().sum().backward()
        W = layer.dequantize_weight()
        x_ref = x.detach().clone().requires_grad_(True)
        b_ref = layer.bias.detach().clone().requires_grad_(True)
        F.linear(x_ref, W, b_ref).square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=1e-6, atol=1e-6)
        assert layer.weight.grad is None
