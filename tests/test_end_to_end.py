"""The user story of the user layer, end to end on a tiny transformers Llama (no downloads):
quantize to NF4, fine-tune PEFT LoRA adapters with an 8-bit optimizer eagerly and compiled,
save through safetensors, reload into a fresh model, get the same outputs.

(Checkpoint exchange with bitsandbytes is covered in test_checkpoint.py.)
"""

from __future__ import annotations

import pytest
import torch

import inductor_quant as iq
from inductor_quant.checkpoint import load_state_dict_file, save_state_dict
from inductor_quant.nn import register_lora_modules

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed")


def _quantized_lora_llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    iq.quantize_model(model, quant_type="nf4", blocksize=64)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(model, register_lora_modules(lora))


def _train(model, optimizer, loss_fn, step_fn, ids, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = loss_fn(ids)
        loss.backward()
        step_fn()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_qlora_8bit_optimizer_save_reload(compiled, tmp_path):
    torch._dynamo.reset()
    model = _quantized_lora_llama(seed=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = iq.optim.AdamW8bit(trainable, lr=torch.tensor(1e-2), min_8bit_size=0)

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    step_fn = optimizer.step
    if compiled:
        loss_fn = torch.compile(loss_fn, backend="inductor", fullgraph=True)
        step_fn = torch.compile(optimizer.step, backend="inductor", fullgraph=True)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = _train(model, optimizer, loss_fn, step_fn, ids, steps=8)

    assert losses[-1] < losses[0] - 0.05, losses
    assert all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in trainable)
    after = model.state_dict()
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key  # the 4-bit base never moves

    path = tmp_path / "qlora.safetensors"
    save_state_dict(model.state_dict(), path)
    reloaded = _quantized_lora_llama(seed=123)  # different random init everywhere
    reloaded.load_state_dict(load_state_dict_file(path))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
