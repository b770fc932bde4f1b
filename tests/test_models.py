"""The built-in TinyLlama: seeded weights, cache-consistent decoding, dtype/device handling, errors."""

import pytest
import torch

from inductor_quant.models import TinyLlamaConfig, apply_rotary, build_model, grouped_query_attention, rotary_tables

SMALL = TinyLlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)


def _prompt(batch=2, seq=5, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _greedy_without_cache(model, tokens, n):
    out = tokens
    with torch.no_grad():
        for _ in range(n):
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def test_config_defaults_and_names():
    config = TinyLlamaConfig()
    assert (config.dim, config.n_layers, config.n_heads, config.vocab_size) == (256, 2, 4, 1024)
    assert config.ffn_dim == 704 and config.head_dim == 64 and config.kv_heads == 4
    model = build_model(SMALL)
    names = {name for name, _ in model.named_modules()}
    for expected in ("lm_head", "embed_tokens", "layers.0.self_attn.q_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.down_proj", "norm"):
        assert expected in names
    assert model.layers[0].self_attn.k_proj.out_features == 2 * SMALL.head_dim  # grouped-query


def test_seeded_weights_are_reproducible_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_model(SMALL, seed=3), build_model(SMALL, seed=3), build_model(SMALL, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if name.endswith("proj.weight"):
            assert not torch.equal(pa, pc), name


def test_forward_shape_and_causality():
    model = build_model(SMALL)
    tokens = _prompt(seq=8)
    with torch.no_grad():
        logits = model(tokens)
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % SMALL.vocab_size
        logits_changed = model(changed)
    assert logits.shape == (2, 8, SMALL.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert 0.3 < logits.std() < 3.0  # unit-gain init: logits neither vanish nor explode
    torch.testing.assert_close(logits[:, :-1], logits_changed[:, :-1])  # earlier positions never see the future
    assert not torch.allclose(logits[:, -1], logits_changed[:, -1])


@pytest.mark.parametrize("heads, kv_heads, seq", [(8, 2, 1), (8, 2, 3), (4, 4, 2)])
def test_grouped_query_attention_equals_expanded_keys_and_values(heads, kv_heads, seq):
    g = torch.Generator().manual_seed(heads + seq)
    q = torch.randn(2, seq, heads, 16, generator=g, dtype=torch.float64).transpose(1, 2)  # strided like the model's
    k, v = (torch.randn(2, kv_heads, 7, 16, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(seq, 7, generator=g) < 0.6
    mask[:, 0] = True  # every query attends somewhere
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1), attn_mask=mask
    )
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), expected, rtol=1e-12, atol=1e-12)


def test_kv_cache_matches_full_forward():
    model = build_model(SMALL)
    tokens = _prompt(seq=10)
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2)
        prefill = model(tokens[:, :6], torch.arange(6))
        decode = [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(6, 10)]
    torch.testing.assert_close(prefill, full[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(decode, dim=1), full[:, 6:], atol=1e-5, rtol=1e-5)


def test_generate_equals_greedy_recomputation():
    model = build_model(SMALL)
    tokens = _prompt()
    out = model.generate(tokens, 7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], tokens)
    assert torch.equal(out, _greedy_without_cache(model, tokens, 7))
    assert torch.equal(model.generate(tokens, 0), tokens)


def test_generate_with_compiled_step_fn():
    model = build_model(SMALL)
    tokens = _prompt(batch=1)
    compiled = torch.compile(model, dynamic=False)
    assert torch.equal(model.generate(tokens, 4, step_fn=compiled), model.generate(tokens, 4))


def test_bf16_model():
    model = build_model(SMALL, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.rope_cos.dtype == torch.float32
    reference = build_model(SMALL)
    tokens = _prompt()
    with torch.no_grad():
        logits = model(tokens)
        expected = reference(tokens)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().mean() < 0.05


def test_rotary_preserves_norm_and_position_zero():
    cos, sin = rotary_tables(8, 16, 10000.0)
    x = torch.randn(1, 2, 16, 8)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 63}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"dim": 12, "n_heads": 4}, "head_dim"),
        ({"n_layers": 0}, "n_layers"),
        ({"hidden_dim": 0}, "hidden_dim"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyLlamaConfig(**kwargs)


def test_generate_errors():
    model = build_model(SMALL)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(_prompt(seq=30), 5)
    with pytest.raises(ValueError, match="tokens"):
        model.generate(torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="n must be"):
        model.generate(_prompt(), -1)
    with pytest.raises(ValueError, match="dtype"):
        build_model(SMALL, dtype=torch.int32)


def test_setup_caches_reuses_buffers_so_compiled_decoding_does_not_recompile():
    model = build_model(SMALL)
    model.setup_caches(2)
    k_cache = model.layers[0].self_attn.kv_cache.k_cache
    k_cache.fill_(1.0)
    model.setup_caches(2)
    assert model.layers[0].self_attn.kv_cache.k_cache is k_cache and not k_cache.any()
    model.setup_caches(1)
    assert model.layers[0].self_attn.kv_cache.k_cache.shape[0] == 1
