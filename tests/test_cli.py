"""The ``inductor-quant`` CLI, run in-process through ``main([...])``: demo, quantize, bench, parser."""

import json

import pytest
import torch
from safetensors import torch as safetensors_torch

from inductor_quant import checkpoint, cli
from inductor_quant.demo import run_demo
from inductor_quant.models import TinyLlamaConfig, build_model
from inductor_quant.nn import Linear4bit, Linear8bit, quantize_model

SMALL = ["--dim", "64", "--layers", "1", "--heads", "2", "--vocab", "128", "--prompt-len", "6", "--new-tokens", "4", "--quiet"]


def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("unquantized", "nf4", "fp4", "int8"):
            rows[cells[0]] = cells
    return rows


def test_demo_eager(capsys, tmp_path):
    json_path = tmp_path / "demo.json"
    assert cli.main(["demo", "--no-compile", "--device", "cpu", "--variants", "nf4,int8", "--json", str(json_path), *SMALL]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert set(rows) == {"unquantized", "nf4", "int8"}
    assert "eager" in out and "total time" in out
    payload = json.loads(json_path.read_text())
    measured = {row["variant"]: row for row in payload["rows"]}
    base, nf4, int8 = measured["unquantized"], measured["nf4"], measured["int8"]
    assert base["max_abs_error"] == 0 and base["token_agreement"] == 1.0
    # quantized weights are smaller, NF4 smaller than 8-bit; 8-bit more accurate than NF4
    assert nf4["weight_bytes"] < int8["weight_bytes"] < base["weight_bytes"]
    assert 0 < int8["mean_abs_error"] < nf4["mean_abs_error"] < 0.5
    assert all(row["tokens_per_s"] > 0 for row in payload["rows"])
    assert base["fusion"] is None


def test_demo_numbers_match_a_direct_computation():
    """The report's error and bytes equal what quantize_model + a full forward give directly."""
    config = TinyLlamaConfig(dim=64, n_layers=1, n_heads=2, vocab_size=128, max_seq_len=32)
    report = run_demo(config, variants=("nf4",), device="cpu", prompt_len=6, new_tokens=1, compile=False)
    reference = build_model(config)
    quantized = build_model(config)
    quantize_model(quantized, bits=4, quant_type="nf4", blocksize=64, skip=("lm_head",))
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (quantized(prompt) - reference(prompt)).abs()
    row = report.row("nf4")
    assert row.max_abs_error == pytest.approx(err.max().item(), rel=1e-4)
    assert row.mean_abs_error == pytest.approx(err.mean().item(), rel=1e-4)
    assert row.weight_bytes == sum(t.numel() * t.element_size() for t in quantized.state_dict().values())
    assert isinstance(quantized.layers[0].mlp.up_proj, Linear4bit)
    assert report.sample[:6] == prompt[0].tolist()


def test_demo_compiled(capsys):
    assert cli.main(["demo", "--device", "cpu", "--variants", "nf4", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "compiled" in out
    rows = _table_rows(out)
    assert set(rows) == {"unquantized", "nf4"}
    fusion = [line for line in out.splitlines() if line.startswith("fusion (nf4")]
    assert len(fusion) == 1 and "generated kernels" in fusion[0]
    assert "; 1 graph compiled" in fusion[0]  # decoding never recompiled
    assert "gemm_4bit" in fusion[0]  # the dequantize + linear pairs were rewritten


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--variants", "nf3", "--no-compile", "--device", "cpu"], "variants"),
        (["demo", "--dim", "63", "--no-compile", "--device", "cpu"], "n_heads"),
        (["demo", "--new-tokens", "0", "--no-compile", "--device", "cpu"], "new_tokens"),
    ],
)
def test_demo_bad_arguments(capsys, argv, message):
    assert cli.main(argv) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_demo_cuda_without_gpu(capsys):
    assert cli.main(["demo", "--device", "cuda", "--no-compile"]) == cli.EXIT_USAGE
    assert "no CUDA GPU" in capsys.readouterr().err


# ---------------------------------------------------------------- quantize
def _checkpoint(tmp_path):
    config = TinyLlamaConfig(dim=64, n_layers=1, n_heads=2, vocab_size=128, max_seq_len=32)
    model = build_model(config, seed=5)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return config, model, path


def test_quantize_round_trip(tmp_path, capsys):
    config, model, path = _checkpoint(tmp_path)
    out_path = tmp_path / "model-nf4.safetensors"
    assert cli.main(["quantize", str(path), str(out_path), "--quant-type", "nf4", "--blocksize", "64"]) == 0
    captured = capsys.readouterr()
    assert "quantized 7 linear layers" in captured.out and str(out_path) in captured.out
    assert "quantizing" in captured.err  # the progress bar
    state = checkpoint.load_state_dict_file(out_path)
    assert "layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in state
    assert "layers.0.mlp.up_proj.weight.nested_absmax" in state
    assert state["lm_head.weight"].dtype == torch.float32  # skipped by default
    assert torch.equal(state["embed_tokens.weight"], model.embed_tokens.weight)

    # loads with load_state_dict into a model prepared with quantize_model, equal to quantizing in memory
    loaded = build_model(config, seed=99)
    quantize_model(loaded, quant_type="nf4", blocksize=64)
    loaded.load_state_dict(state)
    direct = build_model(config, seed=5)
    quantize_model(direct, quant_type="nf4", blocksize=64)
    tokens = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), direct(tokens), rtol=0, atol=0)

    # and in bitsandbytes (the HF prequantized path)
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    prefix = "layers.0.mlp.up_proj."
    layer_sd = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    theirs = bnb.nn.Linear4bit(64, config.ffn_dim, bias=False, compute_dtype=torch.float32)
    stats = {k.removeprefix("weight."): v for k, v in layer_sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(layer_sd["weight"], stats, device="cpu", module=theirs)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), loaded.layers[0].mlp.up_proj(x), rtol=0, atol=0)


def test_quantize_int8_custom_skip_no_progress(tmp_path, capsys):
    config, model, path = _checkpoint(tmp_path)
    out_path = tmp_path / "model-int8.safetensors"
    assert cli.main(["quantize", str(path), str(out_path), "--quant-type", "int8", "--skip", "*embed*", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "quantized 8 linear layers" in captured.out and "quantizing" not in captured.err
    state = checkpoint.load_state_dict_file(out_path)
    assert state["lm_head.weight"].dtype == torch.uint8
    loaded = build_model(config, seed=99)
    quantize_model(loaded, bits=8, skip=())
    loaded.load_state_dict(state)
    assert isinstance(loaded.lm_head, Linear8bit)
    torch.testing.assert_close(loaded.lm_head.dequantize_weight(), model.lm_head.weight, atol=0.02, rtol=0)
    # --no-skip also takes the embedding table (every 2-D weight)
    assert cli.main(["quantize", str(path), str(tmp_path / "all.safetensors"), "--quant-type", "int8", "--no-skip", "--no-progress"]) == 0
    assert "quantized 9 linear layers" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quant-type", "int8", "--no-double-quant"], "4-bit"),
        (["--blocksize", "48"], "blocksize"),
        (["--skip", "lm_head", "--no-skip"], "mutually exclusive"),
    ],
)
def test_quantize_bad_arguments(tmp_path, capsys, extra, message):
    _, _, path = _checkpoint(tmp_path)
    assert cli.main(["quantize", str(path), str(tmp_path / "out.safetensors"), "--no-progress", *extra]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_quantize_missing_or_invalid_input(tmp_path, capsys):
    assert cli.main(["quantize", str(tmp_path / "nope.safetensors"), str(tmp_path / "o.safetensors")]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert cli.main(["quantize", str(garbage), str(tmp_path / "o.safetensors"), "--no-progress"]) == cli.EXIT_USAGE
    assert "garbage.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------- bench and parser
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu(capsys):
    assert cli.main(["bench"]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "tools" in err


def test_bench_runs_the_scripts_with_a_gpu(tmp_path, monkeypatch, capsys):
    """The GPU branch: each script runs in a subprocess with --json DIR/bench_<name>.json plus
    --script-args; a missing script is reported and makes the exit status non-zero."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "bench_kernels.py").write_text(
        "import json, sys\n"
        "json.dump(sys.argv[1:], open(sys.argv[sys.argv.index('--json') + 1], 'w'))\n"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "results"
    status = cli.main(["bench", "--tools-dir", str(tools), "--out", str(out), "--script-args=--only quant"])
    assert status == cli.EXIT_UNAVAILABLE  # bench_e2e.py is missing from this tools dir
    assert "bench_e2e.py does not exist" in capsys.readouterr().err
    argv = json.loads((out / "bench_kernels.json").read_text())
    assert argv == ["--json", str(out / "bench_kernels.json"), "--only", "quant"]
    assert cli.main(["bench", "kernels", "--tools-dir", str(tools), "--out", str(out)]) == 0


def test_tools_dir_is_found_in_the_checkout():
    tools = cli.find_tools_dir()
    assert tools is not None and (tools / "bench_kernels.py").is_file()


def test_parser_registers_every_subcommand(capsys):
    parser = cli.build_parser()
    actions = [a for a in parser._actions if a.dest == "command"]
    assert set(actions[0].choices) >= {"demo", "quantize", "bench", "inspect"}
    assert cli.main([]) == cli.EXIT_USAGE
    assert "demo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert "inductor-quant" in capsys.readouterr().out
