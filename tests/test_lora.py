"""LoRA adapters applied as models stream (`model+lora`), against peft's own `merge_and_unload`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.config import ModelReference
from merger.engine import run_merge
from merger.errors import AdapterTargetError, LoraAdapterError
from merger.validate import validate_config
from helpers import weights

TOKENS = torch.tensor([[1, 5, 17, 42, 9, 3, 60]])


def tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tiny_lora(model_dir: Path, path: Path, *, rslora: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                        init_lora_weights=False)  # random A and B: a zero B would change nothing
    get_peft_model(model, config).save_pretrained(path)
    return path


def peft_merged_logits(model_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    with torch.no_grad():
        return merged(TOKENS).logits


def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(TOKENS).logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.mark.parametrize("rslora", [False, True])
def test_model_plus_lora_merges_to_peft_merge_and_unload(llama: Path, tmp_path: Path, rslora: bool) -> None:
    adapter = tiny_lora(llama, tmp_path / "adapter", rslora=rslora)
    config = f"merge_method: linear\nmodels:\n  - model: {llama}+{adapter}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    run_merge(config, tmp_path / "out", device="cpu")
    expected = peft_merged_logits(llama, adapter)
    assert not torch.allclose(expected, logits(llama), atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(logits(tmp_path / "out"), expected, rtol=1e-5, atol=1e-5)


def test_dict_form_mixed_with_the_plain_model_weighs_the_change(llama: Path, tmp_path: Path) -> None:
    adapter = tiny_lora(llama, tmp_path / "adapter")
    config = (f"merge_method: linear\nmodels:\n  - model: {llama}\n    parameters: {{weight: 1.0}}\n"
              f"  - model: {{model: {llama}, lora: {adapter}}}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    run_merge(config, tmp_path / "out", device="cpu")
    out, base = weights(tmp_path / "out"), weights(llama)
    lora = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    a, b = lora[f"{prefix}.lora_A.weight"].double(), lora[f"{prefix}.lora_B.weight"].double()
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = base[name].double() + 0.5 * (12 / 4) * (b @ a)  # the mean of W and W + (α/r)·B@A
    torch.testing.assert_close(out[name].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(out["model.layers.1.self_attn.k_proj.weight"], base["model.layers.1.self_attn.k_proj.weight"])


def test_references_parse_both_forms() -> None:
    plus = ModelReference.parse("org/model@main+org/adapter")
    form = ModelReference.parse({"model": {"path": "org/model", "revision": "main"}, "lora": {"path": "org/adapter"}})
    assert plus == form and (plus.model, plus.revision, plus.lora) == ("org/model", "main", "org/adapter")
    assert str(plus) == "org/model@main+org/adapter" and plus.base == ModelReference.parse("org/model@main")
    assert plus.key != plus.base.key
    with pytest.raises(ValueError, match="model\\+adapter"):
        ModelReference.parse("org/model+")


def test_adapter_for_a_missing_tensor_is_named(llama: Path, tmp_path: Path) -> None:
    adapter = tiny_lora(llama, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    moved = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(moved, adapter / "adapter_model.safetensors")
    config = f"merge_method: linear\nmodels:\n  - model: {llama}+{adapter}\n    parameters: {{weight: 1.0}}\n"
    with pytest.raises(AdapterTargetError, match=r"changes `model\.layers\.7\..*which model .* does not have"):
        validate_config(config)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"lora_alpha": "x"}, "lora_alpha"),
    ({"peft_type": "IA3"}, "IA3"),
])
def test_unsupported_adapters_are_refused(llama: Path, tmp_path: Path, change: dict, message: str) -> None:
    adapter = tiny_lora(llama, tmp_path / "adapter")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    config = f"merge_method: linear\nmodels:\n  - model: {llama}+{adapter}\n    parameters: {{weight: 1.0}}\n"
    with pytest.raises(LoraAdapterError, match=message):
        validate_config(config)


def test_hub_model_plus_hub_adapter_fetches_the_adapter_files_only(llama: Path, tmp_path: Path, hub) -> None:
    adapter = tiny_lora(llama, tmp_path / "adapter")
    (adapter / "training_args.bin").write_bytes(b"\0" * 1000)  # must never be fetched
    hub.upload_model(llama, "alice/tiny-llama")
    hub.upload_model(adapter, "alice/tiny-lora")
    config = "merge_method: linear\nmodels:\n  - model: alice/tiny-llama+alice/tiny-lora\n    parameters: {weight: 1.0}\ndtype: float32\n"
    assert validate_config(config, token=hub.token).models == ("alice/tiny-llama+alice/tiny-lora",)
    run_merge(config, tmp_path / "out", device="cpu", token=hub.token)
    torch.testing.assert_close(logits(tmp_path / "out"), peft_merged_logits(llama, adapter), rtol=1e-5, atol=1e-5)
    from huggingface_hub.constants import HF_HUB_CACHE

    fetched = {p.name for p in Path(HF_HUB_CACHE, "models--alice--tiny-lora").glob("snapshots/*/*")}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}
    assert "alice/tiny-lora" in (tmp_path / "out" / "README.md").read_text()


def test_fan_in_fan_out_adapter_on_gpt2_conv1d(tmp_path: Path) -> None:
    """GPT-2 stores its projections as (in, out) Conv1D weights: peft's `fan_in_fan_out` LoRA is `(B@A)ᵀ`."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    torch.manual_seed(1)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    text = f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'gpt2'}+{tmp_path / 'adapter'}\n    parameters: {{weight: 1.0}}\n"
    run_merge(text, tmp_path / "out", device="cpu")
    expected = peft_merged_logits(tmp_path / "gpt2", tmp_path / "adapter")
    assert not torch.allclose(expected, logits(tmp_path / "gpt2"), atol=1e-3)
    torch.testing.assert_close(logits(tmp_path / "out"), expected, rtol=1e-5, atol=1e-5)
