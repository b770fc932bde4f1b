"""Pinned values of the code tables (bitsandbytes.md §2.1, §2.2).

The literals below are bitsandbytes' own (so packed data is interchangeable); when bitsandbytes is
importable the tables are also compared with its generators, bit for bit.
"""

import pytest
import torch

from inductor_quant import code_tables as ct

# bitsandbytes.md §2.2, literally.
NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]
FP4_VALUES = [
    0.0, 0.0052083333, 0.6666667, 1.0, 0.3333333, 0.5, 0.1666667, 0.25,
    -0.0, -0.0052083333, -0.6666667, -1.0, -0.3333333, -0.5, -0.1666667, -0.25,
]
FP4_LITERAL_THRESHOLDS = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]


def _f32(values):
    return torch.tensor(values, dtype=torch.float32)


def _bnb_functional():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


def test_nf4_values_pinned():
    code = ct.nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(code, _f32(NF4_VALUES))
    assert torch.equal(ct.get_4bit_code("nf4"), code)
    assert bool((code[1:] > code[:-1]).all()), "NF4 must be ascending (the index is the code)"
    assert code[7].item() == 0.0


def test_nf4_midpoints_are_the_cuda_thresholds():
    # CUDA's dQuantizeNF4 literals are exactly the fp32 midpoints of adjacent NF4 values.
    assert torch.equal(ct.code_midpoints(ct.nf4_code()), _f32(NF4_THRESHOLDS))


def test_fp4_values_pinned():
    code = ct.fp4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    torch.testing.assert_close(code, _f32(FP4_VALUES), rtol=0, atol=1e-7)
    # magnitudes are exactly (0, 0.0625, 8, 12, 4, 6, 2, 3) / 12 and bit 3 is the sign
    magnitudes = _f32([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]) / 12
    assert torch.equal(code[:8], magnitudes)
    assert torch.equal(code[8:], -magnitudes)
    assert ct.FP4_SIGN_BIT == 0b1000
    assert torch.equal(ct.get_4bit_code("fp4"), code)


def test_fp4_thresholds():
    thresholds = list(ct.FP4_THRESHOLDS)
    assert thresholds == FP4_LITERAL_THRESHOLDS
    assert all(a < b for a, b in zip(thresholds, thresholds[1:])), "FP4 thresholds must increase"
    # each literal lies strictly between the two magnitudes it separates (rank order)
    code = ct.fp4_code()
    ranked = code[list(ct.FP4_RANK_TO_CODE)]
    assert bool((ranked[1:] > ranked[:-1]).all()), "FP4_RANK_TO_CODE must list magnitudes ascending"
    t = _f32(thresholds)
    assert bool((ranked[:-1] < t).all() and (t < ranked[1:]).all())
    # they are not the fp32 midpoints (bitsandbytes.md §2.2): 0.583333 and 0.00260417 differ
    assert not torch.equal(t, ct.code_midpoints(ranked))
    assert sorted(ct.FP4_RANK_TO_CODE) == list(range(8))


def test_get_4bit_code_rejects_unknown_type():
    with pytest.raises(ValueError, match="quant_type"):
        ct.get_4bit_code("int4")


def test_signed_dynamic_map_pinned():
    code = ct.dynamic_map(signed=True)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert bool((code[1:] > code[:-1]).all())
    assert code[0].item() == pytest.approx(-0.99296874, abs=1e-8)
    assert code[127].item() == 0.0
    assert code[255].item() == 1.0
    assert code[126].item() == pytest.approx(-5.5e-7, rel=1e-6)
    assert code[128].item() == pytest.approx(5.5e-7, rel=1e-6)
    nonzero = code[code != 0].abs()
    assert nonzero.min().item() == code[128].item()
    assert (code < 0).sum().item() == 127 and (code > 0).sum().item() == 128
    # no -1.0: the map is not symmetric at the top
    assert code.min().item() > -1.0
    # exponent band i holds 2**i magnitudes in 10**(i-6) * (0.1, 1)
    positives = code[128:255].double()
    for i in range(7):
        band = ((positives > 0.1 * 10 ** (i - 6)) & (positives < 10 ** (i - 6))).sum().item()
        assert band == 2**i


def test_unsigned_dynamic_map_pinned():
    code = ct.dynamic_map(signed=False)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert bool((code[1:] > code[:-1]).all())
    assert code[0].item() == 0.0
    assert code[1].item() == pytest.approx(3.25e-7, rel=1e-6)
    assert code[254].item() == pytest.approx(0.9964844, abs=1e-7)
    assert code[255].item() == 1.0


def test_dynamic_map_is_a_fresh_copy():
    a = ct.dynamic_map()
    a.zero_()
    assert ct.dynamic_map()[255].item() == 1.0


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_equals_bitsandbytes(signed):
    F = _bnb_functional()
    expected = F.create_dynamic_map(signed=signed)
    ours = ct.create_dynamic_map(signed=signed)
    assert torch.equal(ours.view(torch.int32), expected.float().view(torch.int32))


def test_nf4_equals_bitsandbytes():
    F = _bnb_functional()
    expected = F.get_4bit_type("nf4", "cpu")
    assert torch.equal(ct.nf4_code().view(torch.int32), expected.float().view(torch.int32))


def test_fp4_equals_bitsandbytes_up_to_the_sign_of_zero():
    # bitsandbytes' Python table stores +0.0 at code 0b1000; its CUDA LUT (dDequantizeFP4Tree:
    # lut[0] * -1) and ours give -0.0. Every other entry is bit-identical.
    F = _bnb_functional()
    expected = F.get_4bit_type("fp4", "cpu").float()
    ours = ct.fp4_code()
    assert torch.equal(ours, expected)
    differ = (ours.view(torch.int32) != expected.view(torch.int32)).nonzero().flatten().tolist()
    assert differ in ([], [8])
    assert torch.signbit(ours[8])


def test_code_midpoints():
    code = _f32([-1.0, 0.0, 0.5, 1.0])
    assert torch.equal(ct.code_midpoints(code), _f32([-0.5, 0.25, 0.75]))
    assert ct.code_midpoints(code.double()).dtype == torch.float32
