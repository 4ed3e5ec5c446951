"""Prompt-routed MoE gates (`hidden`, `hidden_avg`, `hidden_last`, `cheap_embed`), against hand computations.

The expected router rows are computed here independently: transformers' whole model forward with
`output_hidden_states=True` (the state entering each layer), or the embedding matrix read with
safetensors; then mergekit-moe's recipe (mean over positive prompts minus mean over negative prompts,
unit length). The acceptance test builds an MoE of the fixtures' prose and code fine-tunes whose
router sends each eval text mostly to its expert, which a random router does not.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from merger.config.load import load_config
from merger.engine import run_merge
from merger.errors import ArchitectureError, ConfigError, GatePromptError, MergeCancelled, ModelFileError
from merger.execute.prompt_gates import prompt_gate_weights
from merger.io.buffers import BufferPool
from merger.io.loader import TensorReader

from helpers import weights as tensors

PROSE = ("The committee approved the proposal after a long discussion of its costs.",
         "This license allows you to share the work, provided that you give credit.")
CODE = ("def parse(line):\n    key, value = line.split('=', 1)\n    return key",
        "for index, item in enumerate(items):\n    if item is None:")


@pytest.fixture(scope="module")
def fx(fixture_models_dir: Path) -> Path:
    return fixture_models_dir


def _quoted(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def moe_yaml(fx: Path, family: str, mode: str, prose: tuple[str, ...], code: tuple[str, ...],
             negatives: bool = False, extra: str = "") -> str:
    """A 2-expert MoE of `family`'s prose and code fine-tunes around its base; each expert's negative
    prompts (when `negatives`) are the other expert's positive prompts."""
    def expert(name: str, positive: tuple[str, ...], negative: tuple[str, ...]) -> str:
        text = f"  - source_model: {fx / f'{family}-{name}'}\n    positive_prompts: [{', '.join(map(_quoted, positive))}]\n"
        return text + (f"    negative_prompts: [{', '.join(map(_quoted, negative))}]\n" if negatives else "")

    return (f"base_model: {fx / f'{family}-base'}\ngate_mode: {mode}\nexperts_per_token: 1\n{extra}experts:\n"
            + expert("prose", prose, code) + expert("code", code, prose))


# ---------------------------------------------------------------- hand computations


def _prompt_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])


def expected_hidden_rows(model_dir: Path, positive, negative, average: bool) -> torch.Tensor:
    """mergekit's `hidden` rows by transformers' whole-model forward: `(layers, hidden)` for one expert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def mean_state(prompts) -> torch.Tensor:
        per_prompt = []
        for text in prompts:
            with torch.no_grad():
                states = torch.stack(model(_prompt_ids(tokenizer, text), output_hidden_states=True).hidden_states[:-1])
            per_prompt.append(states[:, 0].mean(dim=1) if average else states[:, 0, -1])  # (layers, hidden)
        return torch.stack(per_prompt).mean(dim=0)

    rows = mean_state(positive) - (mean_state(negative) if negative else 0)
    return rows / rows.norm(dim=-1, keepdim=True)


def expected_cheap_rows(model_dir: Path, positive, negative) -> torch.Tensor:
    """mergekit's `cheap_embed` row: unit-length embedding sums, positive minus negative, unit length."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight").float()

    def unit_sum(prompts) -> torch.Tensor:
        total = sum(embed[_prompt_ids(tokenizer, text)[0]].sum(dim=0) for text in prompts)
        return total / total.norm()

    row = unit_sum(positive) - (unit_sum(negative) if negative else 0)
    return row / row.norm()


def gates_of(model_dir: Path, mode: str, prompts, **kwargs) -> torch.Tensor:
    reader = TensorReader(model_dir, BufferPool(max_retained=0))
    try:
        return prompt_gate_weights(mode, prompts, model_dir, reader, torch.device("cpu"), **kwargs)
    finally:
        reader.close()


@pytest.mark.parametrize("mode", ["hidden", "hidden_last", "hidden_avg"])
def test_moe_hidden_gates_are_the_normalised_prompt_states_of_the_base(fx: Path, tmp_path: Path, mode: str) -> None:
    """Through the whole engine: each layer's written router rows are the base's states for the prompts."""
    out = tmp_path / "out"
    run_merge(moe_yaml(fx, "llama", mode, PROSE, CODE[:1], negatives=True), out, device="cpu")
    written = tensors(out)
    average = mode == "hidden_avg"  # mergekit: `hidden` and `hidden_last` take the last token
    prose = expected_hidden_rows(fx / "llama-base", PROSE, CODE[:1], average)
    code = expected_hidden_rows(fx / "llama-base", CODE[:1], PROSE, average)
    computed = gates_of(fx / "llama-base", mode, ((PROSE, CODE[:1]), (CODE[:1], PROSE)))
    for layer in range(6):
        torch.testing.assert_close(computed[layer], torch.stack([prose[layer], code[layer]]), rtol=0, atol=2e-6)
        gate = written[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert gate.dtype == torch.bfloat16 and torch.equal(gate, computed[layer].to(torch.bfloat16))


def test_hidden_gates_run_a_family_with_attention_biases(fx: Path) -> None:
    """Qwen2's decoder layers (q/k/v biases) run through transformers' own layer class."""
    computed = gates_of(fx / "qwen2-base", "hidden", ((CODE, ()), (PROSE, ())))
    torch.testing.assert_close(computed[:, 0], expected_hidden_rows(fx / "qwen2-base", CODE, (), False), rtol=0, atol=2e-6)
    torch.testing.assert_close(computed[:, 1], expected_hidden_rows(fx / "qwen2-base", PROSE, (), False), rtol=0, atol=2e-6)


def test_cheap_embed_gates_are_the_prompt_embedding_means_on_every_layer(fx: Path) -> None:
    computed = gates_of(fx / "llama-base", "cheap_embed", ((PROSE, CODE), (CODE, ())))
    prose, code = expected_cheap_rows(fx / "llama-base", PROSE, CODE), expected_cheap_rows(fx / "llama-base", CODE, ())
    for layer in range(6):
        torch.testing.assert_close(computed[layer], torch.stack([prose, code]), rtol=0, atol=1e-6)
    assert not torch.allclose(prose, expected_cheap_rows(fx / "llama-base", PROSE, ()), atol=1e-3)  # negatives count


def test_mirrored_prompts_are_logged_as_dependent_router_rows(fx: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each expert's negatives being the other's positives makes the rows opposite (mergekit-moe's check warns)."""
    with caplog.at_level("WARNING", logger="merger.execute.prompt_gates"):
        rows = gates_of(fx / "llama-base", "cheap_embed", ((PROSE, CODE), (CODE, PROSE)))
    torch.testing.assert_close(rows[:, 0], -rows[:, 1])
    assert "layer(s) [0, 1, 2, 3, 4, 5] are nearly linearly dependent" in caplog.text


def test_residual_scale_scales_the_experts_down_projection(fx: Path, tmp_path: Path) -> None:
    text = moe_yaml(fx, "llama", "cheap_embed", PROSE, CODE).replace(
        f"source_model: {fx / 'llama-code'}\n", f"source_model: {fx / 'llama-code'}\n    residual_scale: 0.5\n")
    run_merge(text, tmp_path / "out", device="cpu")
    written, code, prose = tensors(tmp_path / "out"), tensors(fx / "llama-code"), tensors(fx / "llama-prose")
    assert torch.equal(written["model.layers.2.block_sparse_moe.experts.1.w2.weight"],
                       (code["model.layers.2.mlp.down_proj.weight"].float() * 0.5).to(torch.bfloat16))
    assert torch.equal(written["model.layers.2.block_sparse_moe.experts.1.w1.weight"], code["model.layers.2.mlp.gate_proj.weight"])
    assert torch.equal(written["model.layers.2.block_sparse_moe.experts.0.w2.weight"], prose["model.layers.2.mlp.down_proj.weight"])


# ---------------------------------------------------------------- refusals


def test_prompt_gates_need_every_experts_positive_prompts(fx: Path) -> None:
    text = moe_yaml(fx, "llama", "hidden", PROSE, CODE).replace("    positive_prompts: " + "[" + ", ".join(map(_quoted, CODE)) + "]\n", "")
    with pytest.raises(ConfigError, match=r"`experts\[1\]\.positive_prompts` is missing: `gate_mode: hidden`"):
        load_config(text)
    with pytest.raises(ConfigError, match=r"every expert has the same prompts"):
        load_config(moe_yaml(fx, "llama", "cheap_embed", PROSE, PROSE))
    assert load_config(text.replace("gate_mode: hidden", "gate_mode: random")).gate_mode == "random"


def test_a_prompt_over_the_token_cap_is_named_and_nothing_is_written(fx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    long_prompt = "the quick brown fox " * 200
    with pytest.raises(GatePromptError, match=r"`experts\[1\]\.positive_prompts\[0\]` .* tokens; a prompt may have at most 512"):
        run_merge(moe_yaml(fx, "llama", "hidden", PROSE, (long_prompt,)), out, device="cpu")
    assert not out.exists()


def test_a_prompt_longer_than_the_base_sliding_window_is_refused(fx: Path, tmp_path: Path) -> None:
    """Prompts run under one plain causal mask, exact only within the base's window."""
    from safetensors.torch import save_file

    base = tmp_path / "windowed"
    base.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).write_bytes((fx / "mistral-base" / name).read_bytes())
    config = json.loads((fx / "mistral-base" / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    save_file(tensors(fx / "mistral-base"), str(base / "model.safetensors"))
    with pytest.raises(GatePromptError, match=r"`experts\[0\]\.positive_prompts\[0\]` .* at most 4"):
        gates_of(base, "hidden", ((PROSE, ()), (CODE, ())))


def test_hidden_gates_on_a_family_whose_forward_is_not_embed_then_layers_are_refused(fx: Path, tmp_path: Path) -> None:
    """Gemma scales its embeddings inside the model's forward: running its layers alone would be wrong."""
    base = tmp_path / "gemma-like"
    base.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
        (base / name).symlink_to(fx / "llama-base" / name)
    config = json.loads((fx / "llama-base" / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(ArchitectureError, match=r"`gate_mode: hidden_avg` runs the base's decoder layers.*`gemma`"):
        gates_of(base, "hidden_avg", ((PROSE, ()), (CODE, ())))
    assert gates_of(base, "cheap_embed", ((PROSE, ()), (CODE, ()))).shape == (6, 2, 128)  # embeddings only


def test_prompt_gates_stop_between_layers_when_cancelled(fx: Path) -> None:
    with pytest.raises(MergeCancelled):
        gates_of(fx / "llama-base", "hidden", ((PROSE, ()), (CODE, ())), should_cancel=lambda: True)


# ---------------------------------------------------------------- the acceptance test: routing by content

def train_pieces(fx: Path, name: str, count: int = 8, length: int = 600) -> tuple[str, ...]:
    """`count` evenly spaced pieces of a train split (never the eval text), cut at spaces."""
    text = gzip.open(fx / f"{name}_train.txt.gz", "rt", encoding="utf-8").read().replace("</s>", "")
    step = len(text) // count
    pieces = [text[i * step: i * step + length] for i in range(count)]
    return tuple(p[p.find(" ") + 1: p.rfind(" ")] for p in pieces)


def top1_shares(model_dir: Path, text: str, tokens: int = 2000) -> torch.Tensor:
    """The share of (token, layer) pairs whose top-1 expert is each expert, over the first `tokens` tokens."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    counts = torch.zeros(model.config.num_local_experts)
    with torch.no_grad():
        for start in range(0, len(ids), 255):
            window = torch.tensor([[tokenizer.bos_token_id] + ids[start:start + 255]])
            for logits in model(window, output_router_logits=True).router_logits:
                counts += torch.bincount(logits.argmax(dim=-1).reshape(-1), minlength=len(counts))
    return counts / counts.sum()


@pytest.fixture(scope="module")
def routed_moe(fx: Path, tmp_path_factory) -> tuple[str, Path]:
    text = moe_yaml(fx, "llama", "hidden", train_pieces(fx, "prose"), train_pieces(fx, "code"), negatives=True)
    out = tmp_path_factory.mktemp("routed") / "out"
    run_merge(text, out, device="cpu")
    return text, out


ROUTED = 0.6  # top-1 share of each eval text's own expert: measured 0.635 (prose) / 0.625 (code); random 0.57 / 0.46


def test_hidden_gates_send_prose_to_the_prose_expert_and_code_to_the_code_expert(
    fx: Path, routed_moe: tuple[str, Path], tmp_path: Path
) -> None:
    prose_text, code_text = (fx / "prose_eval.txt").read_text(), (fx / "code_eval.txt").read_text()
    text, out = routed_moe
    assert top1_shares(out, prose_text)[0] > ROUTED
    assert top1_shares(out, code_text)[1] > ROUTED
    random_out = tmp_path / "random"
    run_merge(text.replace("gate_mode: hidden", "gate_mode: random"), random_out, device="cpu")
    assert not (top1_shares(random_out, prose_text)[0] > ROUTED and top1_shares(random_out, code_text)[1] > ROUTED)


def test_hidden_gate_moe_builds_are_byte_identical(routed_moe: tuple[str, Path], tmp_path: Path) -> None:
    text, out = routed_moe
    run_merge(text, tmp_path / "again", device="cpu")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "again").glob("*.safetensors"))
    for name in shards:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_the_hidden_gate_example_builds_with_the_prompts_routers(fx: Path, tmp_path: Path) -> None:
    root = Path(__file__).parents[1]
    text = (root / "templates/examples/fixture-moe-hidden.yaml").read_text().replace("tests/data/fixtures", str(fx))
    config = load_config(text)
    run_merge(text, tmp_path / "out", device="cpu")
    prompts = tuple((tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in config.experts)
    computed = gates_of(fx / "llama-base", "hidden", prompts)
    gate = tensors(tmp_path / "out")["model.layers.5.block_sparse_moe.gate.weight"]
    assert torch.equal(gate, computed[5].to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "computed\nfrom each expert's prompts" in card and "randomly initialised" not in card


def test_a_qwen2_moe_shared_expert_gate_comes_from_its_own_prompts(fx: Path, tmp_path: Path) -> None:
    """Under prompt gates a shared expert's gate is its prompts' row (mergekit-moe), computed with the routers."""
    shared = "shared_experts:\n  - source_model: {}\n    positive_prompts: [{}]\n".format(
        fx / "qwen2-base", _quoted(CODE[1]))
    out = tmp_path / "out"
    run_merge(moe_yaml(fx, "qwen2", "hidden", PROSE[:1], CODE[:1], extra=shared), out, device="cpu")
    written = tensors(out)
    expected = {name: expected_hidden_rows(fx / "qwen2-base", prompts, (), False)
                for name, prompts in (("prose", PROSE[:1]), ("code", CODE[:1]), ("shared", CODE[1:]))}
    for layer in (0, 3):
        router = written[f"model.layers.{layer}.mlp.gate.weight"].float()
        gate = written[f"model.layers.{layer}.mlp.shared_expert_gate.weight"].float()
        torch.testing.assert_close(router, torch.stack([expected["prose"][layer], expected["code"][layer]]),
                                   rtol=0, atol=1e-2)  # bfloat16 as written
        torch.testing.assert_close(gate, expected["shared"][layer][None], rtol=0, atol=1e-2)
        assert (gate[0] - expected["prose"][layer]).abs().max() > 0.05  # not a router row reused
    without = moe_yaml(fx, "qwen2", "hidden", PROSE[:1], CODE[:1],
                       extra=f"shared_experts:\n  - source_model: {fx / 'qwen2-base'}\n")
    with pytest.raises(ConfigError, match=r"`shared_experts\[0\]\.positive_prompts` is missing"):
        run_merge(without, tmp_path / "refused", device="cpu")


def test_a_base_whose_tokenizer_does_not_load_is_named_without_the_servers_folder(fx: Path, tmp_path: Path) -> None:
    # On a worker the base's folder is the Hub cache: the error names `base_model`, never the folder.
    import shutil

    base = tmp_path / "models--org--base" / "snapshots" / "0123abcd"
    shutil.copytree(fx / "llama-base", base)
    for name in base.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            name.unlink()
    (base / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ModelFileError) as refused:
        gates_of(base, "hidden", ((PROSE, ()), (CODE, ())))
    assert "`base_model`: its config or tokenizer does not load" in str(refused.value)
    assert str(tmp_path) not in str(refused.value) and "snapshots" not in str(refused.value)


def test_a_prompt_over_the_cap_is_refused_at_validation_before_any_weight_is_downloaded(fx: Path, hub) -> None:
    # The worker would download every expert before the forward pass found it: validation reads the
    # base's tokenizer files only (as it reads tokenizers), and refuses there.
    import os

    from merger.validate import validate_config

    refs = {kind: hub.upload_model(fx / f"llama-{kind}", f"alice/gate-cap-{kind}") for kind in ("base", "prose", "code")}
    long_prompt = "the quick brown fox " * 200
    text = moe_yaml(fx, "llama", "hidden", PROSE, (long_prompt,))
    for kind, ref in refs.items():
        text = text.replace(str(fx / f"llama-{kind}"), ref)
    with pytest.raises(GatePromptError, match=r"`experts\[1\]\.positive_prompts\[0\]` .* tokens; a prompt may have at most 512"):
        validate_config(text, token=hub.token)
    cache = Path(os.environ["HF_HOME"]) / "hub"
    downloaded = [p.name for p in cache.rglob("*") if "gate-cap" in str(p) and p.is_file()]
    assert "tokenizer.json" in downloaded and not any(name.endswith(".safetensors") for name in downloaded)
    many = tuple(f"prompt number {i} " + "about prose and its long sentences " * 8 for i in range(256))
    with pytest.raises(GatePromptError, match=r"at most 16384 are run"):  # 2 x 256 prompts: the total cap
        validate_config(moe_yaml(fx, "llama", "hidden", many, tuple(p.replace("prose", "code") for p in many)))
    validate_config(moe_yaml(fx, "llama", "hidden", PROSE, CODE))  # prompts within the caps pass
