"""QLoRA: autograd through the 4-bit matmul, eagerly and compiled, and PEFT LoRA on Linear4bit.

The gradient oracle is autograd through ``F.linear`` with the dequantized weight (the reference
forward), with fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

from inductor_quant.nn import Linear4bit, Linear8bit, quantize_model
from inductor_quant.quant_state import dequantize_4bit, quantize_4bit

gemm_4bit = torch.ops.inductor_quant.gemm_4bit


def _weight(N: int, K: int, quant_type: str, nested: bool):
    packed, state = quantize_4bit(torch.randn(N, K), blocksize=64, quant_type=quant_type, compress_statistics=nested)
    if nested:
        absmax_args = (state.state2.absmax, state.absmax, state.state2.code, state.offset)
    else:
        absmax_args = (state.absmax, None, None, None)
    return packed, state, absmax_args


def _gemm(A, packed, N, K, absmax_args, quant_type, bias):
    absmax, absmax_8bit, absmax_code, absmax_offset = absmax_args
    return gemm_4bit(A, packed, [N, K], absmax, 64, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)


@pytest.mark.parametrize(
    "quant_type,nested,with_bias,dtype",
    [("nf4", True, True, torch.float32), ("fp4", False, False, torch.float32), ("nf4", False, True, torch.bfloat16)],
)
def test_gemm_4bit_backward_matches_reference(quant_type, nested, with_bias, dtype):
    N, K = 48, 160
    packed, state, absmax_args = _weight(N, K, quant_type, nested)
    W = dequantize_4bit(packed, state, dtype=dtype)
    A = torch.randn(2, 3, K, dtype=dtype, requires_grad=True)
    bias = torch.randn(N, dtype=dtype, requires_grad=True) if with_bias else None
    grad_out = torch.randn(2, 3, N, dtype=dtype)
    _gemm(A, packed, N, K, absmax_args, quant_type, bias).backward(grad_out)

    A_ref = A.detach().clone().requires_grad_(True)
    bias_ref = None if bias is None else bias.detach().clone().requires_grad_(True)
    F.linear(A_ref, W, bias_ref).backward(grad_out)
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-5}
    torch.testing.assert_close(A.grad, A_ref.grad, **tol)
    if with_bias:
        torch.testing.assert_close(bias.grad, bias_ref.grad, **tol)
    # float64 oracle for the input gradient
    torch.testing.assert_close(A.grad.double(), grad_out.double() @ W.double(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=5e-2 if dtype == torch.bfloat16 else 1e-4)


def test_gemm_4bit_grad_only_for_what_requires_it():
    N, K = 32, 64
    packed, _, absmax_args = _weight(N, K, "nf4", True)
    bias = torch.randn(N, requires_grad=True)
    A = torch.randn(4, K)
    _gemm(A, packed, N, K, absmax_args, "nf4", bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((N,), 4.0))
    assert A.grad is None
    opcheck(gemm_4bit.default, (A.requires_grad_(True), packed, [N, K], *absmax_args[:1], 64, "nf4", bias, *absmax_args[1:]))


def test_gemm_4bit_backward_compiled_inductor():
    torch._dynamo.reset()
    N, K = 40, 128
    packed, _, absmax_args = _weight(N, K, "nf4", True)

    def loss_fn(A, bias):
        return _gemm(A, packed, N, K, absmax_args, "nf4", bias).square().sum()

    compiled = torch.compile(loss_fn, backend="inductor", fullgraph=True)
    A = torch.randn(3, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    grads = torch.autograd.grad(compiled(A, bias), (A, bias))
    expected = torch.autograd.grad(loss_fn(A, bias), (A, bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


class LoraLinear(nn.Module):
    """A minimal LoRA adapter on a frozen quantized base (what PEFT builds, without PEFT)."""

    def __init__(self, base: nn.Module, r: int = 4) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


def _adapter_model(bits: int) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 8))
    quantize_model(model, bits=bits, skip=())
    model[0] = LoraLinear(model[0])
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.lora_A.weight.requires_grad_(True)
            module.lora_B.weight.requires_grad_(True)
    return model


@pytest.mark.parametrize("compiled,bits", [(False, 4), (True, 4), (False, 8)])
def test_adapter_training_through_frozen_quantized_layers(compiled, bits):
    """The adapter sits below two frozen quantized layers, so its gradient must pass through
    their backward (gemm_4bit's registered autograd eagerly; dequantize + linear compiled)."""
    torch._dynamo.reset()
    model = _adapter_model(bits)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    x = torch.randn(32, 64)
    lora_B = model[0].lora_B.weight
    with torch.no_grad():  # a target the adapter can reach
        lora_B.normal_(std=0.5)
        target = model(x)
        lora_B.normal_(std=0.02)

    def loss_fn(inp):
        return F.mse_loss(model(inp), target)

    step = torch.compile(loss_fn, backend="inductor", fullgraph=True) if compiled else loss_fn
    eager_grads = torch.autograd.grad(loss_fn(x), [model[0].lora_A.weight, model[0].lora_B.weight])
    grads = torch.autograd.grad(step(x), [model[0].lora_A.weight, model[0].lora_B.weight])
    for got, want in zip(grads, eager_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = step(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for key, value in model.state_dict().items():
        if "lora" not in key:
            assert torch.equal(value, frozen[key]), key
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)


def _tiny_llama(layers: int = 2):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def test_peft_lora_trains_on_linear4bit():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from inductor_quant.nn import register_lora_modules
    from inductor_quant.nn.lora import QuantizedLoraLinear

    model = _tiny_llama()
    quantize_model(model, quant_type="nf4")
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    config = register_lora_modules(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(model, config)
    attn = model.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantizedLoraLinear) and isinstance(attn.q_proj.base_layer, Linear4bit)
    assert isinstance(attn.k_proj, Linear4bit)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == 2 * 2 * 2

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 96, (4, 16))
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    # the frozen quantized base is bit-identical; the layer-0 adapters (below layer 1's 4-bit
    # projections) were trained too
    base_after = model.base_model.model.state_dict()
    for key, value in base_before.items():
        peft_key = key.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")
        assert torch.equal(base_after[peft_key], value), key
    assert attn.q_proj.lora_B["default"].weight.abs().sum() > 0


def test_peft_llama_compiles_fullgraph():
    """The PEFT-wrapped quantized transformers model traces as one graph (no graph break from
    our layers); compiled gradients equal eager ones."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from inductor_quant.nn import register_lora_modules

    torch._dynamo.reset()
    model = _tiny_llama(layers=1)
    quantize_model(model, quant_type="nf4")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(model, register_lora_modules(config))
    ids = torch.randint(0, 96, (2, 12))

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.autograd.grad(torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(ids), params)
    eager = torch.autograd.grad(loss_fn(ids), params)
    for got, want in zip(compiled, eager):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_peft_merge_requantizes_and_unmerge_restores():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from inductor_quant.nn import register_lora_modules

    model = nn.Sequential(nn.Linear(64, 64))
    quantize_model(model, skip=())
    wrapped = peft.get_peft_model(model, register_lora_modules(peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)))
    layer = wrapped.base_model.model[0]
    x = torch.randn(3, 64)
    with torch.no_grad():
        unmerged_out = wrapped(x)
        W = layer.base_layer.dequantize_weight()
        delta = layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    expected = Linear4bit(64, 64, quant_type="nf4")
    expected.set_weight(W + delta)
    torch.testing.assert_close(layer.base_layer.dequantize_weight(), expected.dequantize_weight(), rtol=0, atol=0)
    with torch.no_grad():
        merged_out = wrapped(x)
    assert (merged_out - unmerged_out).abs().mean() < 0.1 * unmerged_out.abs().mean()
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.unmerge()
    assert not layer.merged
    assert (layer.base_layer.dequantize_weight() - W).abs().mean() < 0.2 * W.abs().mean()


def test_peft_rejects_variants_that_need_the_base_weight():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from inductor_quant.nn import register_lora_modules

    model = nn.Sequential(nn.Linear(32, 32))
    quantize_model(model, skip=())
    with pytest.raises(ValueError, match="variant"):
        peft.get_peft_model(model, register_lora_modules(peft.LoraConfig(r=2, target_modules=["0"], use_dora=True)))
    with pytest.raises(TypeError, match="LoraConfig"):
        register_lora_modules({"r": 2})


def test_linear8bit_peft_adapter():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from inductor_quant.nn import register_lora_modules

    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))
    quantize_model(model, bits=8, skip=())
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, register_lora_modules(config))
    first = wrapped.base_model.model[0]
    assert isinstance(first.base_layer, Linear8bit)
    x = torch.randn(8, 32)
    wrapped(x).square().sum().backward()
    # layer 0's adapter gets its gradient through layer 2's frozen 8-bit base
    assert first.lora_A["default"].weight.grad.abs().sum() > 0
    assert first.lora_B["default"].weight.grad.abs().sum() > 0
    assert first.base_layer.weight.grad is None
