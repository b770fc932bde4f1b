"""Checkpoints: bitsandbytes interchange (both directions), safetensors save/load, file-level
quantization, meta-device loading, and clear errors for corrupt or mismatched checkpoints.

bitsandbytes 0.50.2 quantizes on CPU when an unquantized ``Linear4bit`` is moved with
``.to("cpu")`` (``Params4bit._quantize`` -> ``bnb.functional.quantize_4bit`` -> its CPU
backend), and loads a quantized checkpoint through ``Params4bit.from_prequantized`` (the path HF
``transformers`` uses). bitsandbytes' layers are kept in train mode so its CPU forward does not
repack the weight (an AVX512-BF16-only path); that does not change the math.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from inductor_quant import checkpoint
from inductor_quant.nn import Linear4bit, Linear8bit, quantize_model
from inductor_quant.quant_state import CheckpointFormatError, QuantState, dequantize_4bit, quantize_4bit

safetensors_torch = pytest.importorskip("safetensors.torch")


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def bnb_linear(W: torch.Tensor, bias: torch.Tensor, quant_type: str, nested: bool, storage: torch.dtype):
    """A bitsandbytes Linear4bit quantized on CPU from the full-precision ``W``, ``bias``."""
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(
        W.shape[1], W.shape[0], compute_dtype=torch.float32, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )
    layer.load_state_dict({"weight": W, "bias": bias})
    return layer.to("cpu")


def bnb_from_state_dict(sd: dict[str, torch.Tensor], in_features: int, out_features: int):
    """A bitsandbytes Linear4bit loaded from a quantized state dict (the HF loader path)."""
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32)
    stats = {key.removeprefix("weight."): value for key, value in sd.items() if key.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    layer.bias = nn.Parameter(sd["bias"])
    return layer


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (packed 4-bit bytes viewed as bf16 can hold NaN patterns)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


CONFIGS = [
    ("nf4", True, torch.uint8),
    ("nf4", False, torch.uint8),
    ("fp4", True, torch.uint8),
    ("fp4", False, torch.bfloat16),
]


@pytest.mark.parametrize("quant_type,nested,storage", CONFIGS)
def test_bitsandbytes_checkpoint_loads_here(tmp_path, quant_type, nested, storage):
    W, bias = torch.randn(96, 256), torch.randn(96)
    theirs = bnb_linear(W, bias, quant_type, nested, storage)
    path = tmp_path / "bnb.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    x = torch.randn(5, 256)
    with torch.no_grad():
        expected = theirs(x)
    for device in ("meta", "cpu"):
        ours = Linear4bit(256, 96, device=device)  # default config differs: the checkpoint's is adopted
        ours.load_state_dict(checkpoint.load_state_dict_file(path))
        assert (ours.quant_type, ours.compress_statistics, ours.quant_storage) == (quant_type, nested, storage)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
    bnb = _bnb()
    torch.testing.assert_close(
        ours.dequantize_weight(), bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state), rtol=0, atol=0
    )


@pytest.mark.parametrize("quant_type,nested,storage", CONFIGS)
def test_our_checkpoint_loads_in_bitsandbytes(tmp_path, quant_type, nested, storage):
    ours = Linear4bit(256, 96, quant_type=quant_type, compress_statistics=nested, quant_storage=storage)
    path = tmp_path / "ours.safetensors"
    checkpoint.save_model(ours, path)
    sd = safetensors_torch.load_file(str(path))
    theirs = bnb_from_state_dict(sd, 256, 96)
    x = torch.randn(4, 256)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    # bitsandbytes writes back exactly what we wrote (the JSON blob included)
    again = theirs.state_dict()
    assert set(again) == set(sd)
    for key, value in sd.items():
        assert same_bytes(again[key], value), key


def test_same_quantization_as_bitsandbytes():
    """NF4 bytes equal bitsandbytes' (its CPU backend picks NF4 by the same midpoints). Its CPU
    FP4 quantizer uses midpoint thresholds instead of the CUDA literals we follow
    (bitsandbytes.md §2.2-2.3), so a few values near a threshold differ by one code."""
    W, bias = torch.randn(128, 256), torch.randn(128)
    linear = nn.Linear(256, 128)
    with torch.no_grad():
        linear.weight.copy_(W)
        linear.bias.copy_(bias)
    for quant_type in ("nf4", "fp4"):
        theirs = bnb_linear(W, bias, quant_type, True, torch.uint8).state_dict()
        ours = Linear4bit.from_linear(linear, quant_type=quant_type).state_dict()
        assert list(ours) == list(theirs)
        for key in ours:
            if quant_type == "nf4" or key not in ("weight",):
                assert torch.equal(ours[key], theirs[key]), key
        if quant_type == "fp4":
            same = (ours["weight"] == theirs["weight"]).float().mean()
            assert 0.97 < same < 1


def test_quant_state_dict_roundtrip_and_bitsandbytes_state():
    bnb = _bnb()
    W = torch.randn(100, 64)  # 6400 values, 100 blocks: the last nested block is partial
    for nested in (True, False):
        packed, theirs = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type="nf4")
        as_dict = theirs.as_dict(packed=True)
        ours = QuantState.from_dict(as_dict)
        assert ours.nested is nested and ours.shape == W.shape and ours.dtype == torch.float32
        torch.testing.assert_close(
            dequantize_4bit(packed, ours), bnb.functional.dequantize_4bit(packed, theirs), rtol=0, atol=0
        )
        mine = ours.as_dict(packed=True)
        assert set(mine) == set(as_dict) and all(torch.equal(mine[k], as_dict[k]) for k in mine)
        plain = QuantState.from_dict(ours.as_dict(packed=False))
        torch.testing.assert_close(dequantize_4bit(packed, plain), dequantize_4bit(packed, ours), rtol=0, atol=0)


# --- corrupt and mismatched checkpoints: the error names the key ----------------------------------


def _blob(sd, key="0.weight.quant_state.bitsandbytes__nf4"):
    return json.loads(bytes(sd[key].tolist()).decode())


def _set_blob(sd, meta, key="0.weight.quant_state.bitsandbytes__nf4"):
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def _mutate_shape(sd):
    meta = _blob(sd)
    meta["shape"] = [64, 96]
    _set_blob(sd, meta)


def _mutate_blocksize(sd):
    meta = _blob(sd)
    meta["blocksize"] = 48
    _set_blob(sd, meta)


def _mutate_dtype(sd):
    meta = _blob(sd)
    meta["dtype"] = "__import__('os')"
    _set_blob(sd, meta)


CORRUPTIONS = {
    "truncated absmax": (lambda sd: sd.update({"0.weight.absmax": sd["0.weight.absmax"][:-1]}), r"0\.weight\.absmax: expected 96"),
    "absmax dtype": (lambda sd: sd.update({"0.weight.absmax": sd["0.weight.absmax"].float()}), r"0\.weight\.absmax: expected dtype torch\.uint8"),
    "packed size": (lambda sd: sd.update({"0.weight": sd["0.weight"][:-2]}), r"0\.weight: expected the packed 4-bit weight"),
    "bad json": (lambda sd: sd.update({"0.weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34, 255], dtype=torch.uint8)}), r"0\.weight\.quant_state\.bitsandbytes__nf4: not a valid JSON"),
    "shape mismatch": (_mutate_shape, r"0\.weight\.quant_state\.bitsandbytes__nf4: the checkpoint's weight has shape \(64, 96\)"),
    "blocksize": (_mutate_blocksize, r"bitsandbytes__nf4\.blocksize: expected a power of two"),
    "dtype string": (_mutate_dtype, r"bitsandbytes__nf4\.dtype: expected one of"),
    "missing nested map": (lambda sd: sd.pop("0.weight.nested_quant_map"), r"0\.weight\.nested_quant_map: missing"),
    "unknown entry": (lambda sd: sd.update({"0.weight.scales": torch.ones(3)}), r"0\.weight\.scales: unexpected entry"),
    "custom code table": (lambda sd: sd.update({"0.weight.quant_map": sd["0.weight.quant_map"] * 2}), r"0\.weight\.quant_map: is not the nf4 table"),
    "wrong type suffix": (
        lambda sd: sd.update({"0.weight.quant_state.bitsandbytes__fp4": sd.pop("0.weight.quant_state.bitsandbytes__nf4")}),
        r"bitsandbytes__fp4: its quant_type 'nf4' does not match",
    ),
    "no quant state": (
        lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("0.weight.")],
        r"0\.weight: expected a floating-point weight of shape \(96, 64\)",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_checkpoint_error_names_the_key(name):
    mutate, message = CORRUPTIONS[name]
    source = nn.Sequential(Linear4bit(64, 96, quant_type="nf4"))
    sd = dict(source.state_dict())
    mutate(sd)
    target = nn.Sequential(Linear4bit(64, 96, quant_type="nf4"))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(sd)
    # a failed load leaves the quantized weight as it was (as nn.Module, other tensors may load)
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("0.weight"))


def test_mismatched_layer_and_8bit_errors():
    sd = nn.Sequential(Linear4bit(64, 96)).state_dict()
    with pytest.raises(RuntimeError, match=r"0\.weight\.quant_state\.bitsandbytes__fp4: the checkpoint's weight has shape \(96, 64\), this layer is \(96, 128\)"):
        nn.Sequential(Linear4bit(128, 96)).load_state_dict(sd)
    sd8 = dict(nn.Sequential(Linear8bit(64, 32)).state_dict())
    sd8["0.weight.absmax"] = sd8["0.weight.absmax"][:1]
    with pytest.raises(RuntimeError, match=r"0\.weight\.absmax: expected 8 elements"):
        nn.Sequential(Linear8bit(64, 32)).load_state_dict(sd8)
    missing = dict(nn.Sequential(Linear4bit(64, 96)).state_dict())
    missing.pop("0.bias")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0\.bias"'):
        nn.Sequential(Linear4bit(64, 96)).load_state_dict(missing)
    with pytest.raises(CheckpointFormatError, match="absmax: missing"):
        QuantState.from_dict({"quant_map": torch.zeros(16)})


class _NotAllowed:
    pass


def test_files_are_never_unpickled_unsafely(tmp_path):
    good = tmp_path / "plain.pt"
    torch.save({"w": torch.arange(4.0)}, good)
    assert torch.equal(checkpoint.load_state_dict_file(good)["w"], torch.arange(4.0))
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "payload": _NotAllowed()}, evil)
    with pytest.raises(ValueError, match="evil.pt: cannot be read as a weights-only torch checkpoint"):
        checkpoint.load_state_dict_file(evil)
    broken = tmp_path / "broken.safetensors"
    checkpoint.save_model(Linear4bit(64, 32), broken)
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(ValueError, match="broken.safetensors: not a valid safetensors file"):
        checkpoint.load_state_dict_file(broken)
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        checkpoint.save_model(Linear4bit(64, 32), tmp_path / "x.bin")


# --- whole models -------------------------------------------------------------------------


def _llama_config(tied: bool):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    return transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )


def _llama(config):
    import transformers

    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_llama_save_and_reload(tmp_path, tied):
    config = _llama_config(tied)
    model = _llama(config)
    report = quantize_model(model, quant_type="nf4")
    assert len(report.quantized) == 14 and report.bytes_after < report.bytes_before / 3
    path = tmp_path / "q.safetensors"
    checkpoint.save_model(model, path)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits

    fresh = _llama(config)  # full precision: load_quantized swaps the quantized layers in
    checkpoint.load_quantized(fresh, path)
    assert isinstance(fresh.model.layers[1].mlp.down_proj, Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)

    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")
    with accelerate.init_empty_weights():  # parameters on meta; buffers (rotary) stay real
        empty = _llama(config)
    quantize_model(empty, quant_type="fp4", compress_statistics=False)  # the file's config wins
    empty.load_state_dict(checkpoint.load_state_dict_file(path), assign=True)
    if tied:
        empty.tie_weights()
    layer = empty.model.layers[0].self_attn.q_proj
    assert layer.quant_type == "nf4" and layer.compress_statistics and not layer.weight.is_meta
    with torch.no_grad():
        torch.testing.assert_close(empty(ids).logits, expected, rtol=0, atol=0)


def test_meta_model_loads_full_precision_checkpoint():
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")
    config = _llama_config(False)
    full = _llama(config)
    state = full.state_dict()
    expected = _llama(config)
    quantize_model(expected)
    expected.load_state_dict(state)
    with accelerate.init_empty_weights():
        empty = _llama(config)
    quantize_model(empty)
    empty.load_state_dict(state, assign=True)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(empty(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_quantize_safetensors_file(tmp_path):
    config = _llama_config(False)
    model = _llama(config)
    fp_path, q_path = tmp_path / "fp.safetensors", tmp_path / "q.safetensors"
    checkpoint.save_model(model, fp_path, metadata={"source": "test"})
    report = checkpoint.quantize_safetensors(fp_path, q_path, "nf4", 64, True)
    assert len(report.quantized) == 14 and sorted(report.skipped) == ["lm_head", "model.embed_tokens"]
    assert report.bytes_after < report.bytes_before / 2
    assert os.path.getsize(q_path) < os.path.getsize(fp_path) / 2
    with safetensors_torch.safe_open(str(q_path), framework="pt") as reader:
        assert reader.metadata()["source"] == "test"

    reference = _llama(config)
    quantize_model(reference)
    reference.load_state_dict(model.state_dict())
    loaded = _llama(config)
    checkpoint.load_quantized(loaded, q_path)
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)

    # one of the file's layers, loaded by bitsandbytes, computes what ours does
    sd = safetensors_torch.load_file(str(q_path))
    prefix = "model.layers.1.self_attn.o_proj."
    layer_sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    layer_sd["bias"] = torch.zeros(64)
    theirs = bnb_from_state_dict(layer_sd, 64, 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), loaded.model.layers[1].self_attn.o_proj(x), rtol=0, atol=0)


def test_quantize_safetensors_8bit_include_and_errors(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    fp_path, q_path = tmp_path / "fp.safetensors", tmp_path / "q8.safetensors"
    checkpoint.save_model(model, fp_path)
    report = checkpoint.quantize_safetensors(fp_path, q_path, bits=8, include=("0", "2"), progress=True)
    assert report.quantized == ["0", "2"] and report.skipped == ["4"]
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    checkpoint.load_quantized(fresh, q_path)
    assert isinstance(fresh[0], Linear8bit) and isinstance(fresh[2], Linear8bit) and type(fresh[4]) is nn.Linear
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0.05, atol=0.02)
    # quantizing a quantized file passes its quantized tensors through unchanged
    twice = tmp_path / "twice.safetensors"
    again = checkpoint.quantize_safetensors(q_path, twice, bits=8)
    assert again.quantized == ["4"]
    with pytest.raises(ValueError, match="out_path must differ"):
        checkpoint.quantize_safetensors(fp_path, fp_path)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        checkpoint.quantize_safetensors(fp_path, tmp_path / "out.pt")
    with pytest.raises(ValueError, match=r"^0\.weight: quant_storage=torch\.float32 needs"):
        checkpoint.quantize_state_dict({"0.weight": torch.randn(3, 5)}, quant_storage=torch.float32)


def test_quantize_4bit_state_matches_module():
    W = torch.randn(32, 128)
    packed, state = quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    layer = Linear4bit(128, 32, quant_type="nf4")
    layer.set_weight(W)
    assert torch.equal(layer.weight, packed)
    torch.testing.assert_close(layer.dequantize_weight(), dequantize_4bit(packed, state), rtol=0, atol=0)
