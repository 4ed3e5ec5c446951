"""MoE outputs beside Mixtral: Qwen2-MoE (with its shared expert) and Qwen3-MoE, loaded with transformers.

Built from identical experts, the routed part of an MoE is the dense MLP whatever the gate: the top-k
routing weights are renormalised to sum to 1 (`norm_topk_prob`). A Qwen2-MoE adds its shared expert,
scaled by `sigmoid(shared_expert_gate · x)`: the tests compute that path independently, with forward
hooks on the dense models' own MLPs and the gate read from the written file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from merger.config.load import load_config
from merger.engine import run_merge
from merger.errors import ArchitectureError, ArchitectureSettingError, MergerError, UnmergedTensorsError
from helpers import weights as tensors

PROMPT = torch.tensor([[1, 57, 301, 1200, 44, 9, 3000, 17, 250, 4001]])
SMALL_PROMPT = PROMPT % 256  # for the tiny Qwen3 built here (vocabulary 256)


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    return model.eval()


def logits(model, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(prompt).logits


def moe_yaml(base: Path, experts: list[Path], shared: Path | None = None, scale: float | None = None, **top) -> str:
    lines = [f"base_model: {base}", "gate_mode: random", *(f"{k}: {v}" for k, v in top.items()), "experts:"]
    lines += [f"  - source_model: {e}" for e in experts]
    if shared is not None:
        lines += ["shared_experts:", f"  - source_model: {shared}"] + ([f"    residual_scale: {scale}"] if scale is not None else [])
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def fx(fixture_models_dir: Path) -> Path:
    return fixture_models_dir


def dense_plus_shared(dense: Path, shared: Path, gates: list[torch.Tensor], scale: float) -> torch.Tensor:
    """The dense model's logits with each layer's MLP output m(x) replaced by
    m(x) + sigmoid(x·g) · scale · shared_mlp(x): the Qwen2-MoE of identical experts, computed without it."""
    model, donor = load(dense), load(shared)
    for layer, gate, shared_layer in zip(model.model.layers, gates, donor.model.layers):
        def hook(module, inputs, output, gate=gate.float(), shared_mlp=shared_layer.mlp):
            x = inputs[0]
            return output + torch.sigmoid(x @ gate.T) * scale * shared_mlp(x)
        layer.mlp.register_forward_hook(hook)
    return logits(model)


@pytest.mark.parametrize("scale", [0.5, 0.0])
def test_qwen2_moe_of_identical_experts_is_the_dense_model_plus_its_gated_shared_expert(fx: Path, tmp_path: Path, scale) -> None:
    dense, shared, out = fx / "qwen2-base", fx / "qwen2-prose", tmp_path / "out"
    run_merge(moe_yaml(dense, [dense, dense, dense], shared, scale, experts_per_token=2), out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] == 3
    assert config["norm_topk_prob"] is True and config["shared_expert_intermediate_size"] == 384
    written = tensors(out)
    gates = [written[f"model.layers.{i}.mlp.shared_expert_gate.weight"] for i in range(4)]
    assert gates[0].shape == (1, 128) and written["model.layers.0.mlp.gate.weight"].shape == (3, 128)
    assert torch.equal(written["model.layers.2.mlp.shared_expert.down_proj.weight"],
                       tensors(shared)["model.layers.2.mlp.down_proj.weight"] * scale)
    moe = logits(load(out))
    torch.testing.assert_close(moe, dense_plus_shared(dense, shared, gates, scale), rtol=1e-4, atol=1e-4)
    if scale:  # the shared path changes the output: the comparison above would catch a dropped one
        assert (moe - logits(load(dense))).abs().max() > 1e-2
    else:
        torch.testing.assert_close(moe, logits(load(dense)), rtol=1e-4, atol=1e-4)


def test_qwen2_moe_from_llama_experts_gets_zero_qkv_biases_and_computes_like_llama(fx: Path, tmp_path: Path) -> None:
    """`architecture: qwen` takes Llama experts (as mergekit-moe); Qwen2-MoE's q/k/v biases are written as zeros."""
    dense, out = fx / "llama-code", tmp_path / "out"
    run_merge(moe_yaml(dense, [dense, dense], dense, 0.0, architecture="qwen"), out, device="cpu")
    written = tensors(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    assert written["model.layers.1.self_attn.k_proj.bias"].shape == (written["model.layers.1.self_attn.k_proj.weight"].shape[0],)
    assert all(not t.any() for n, t in written.items() if n.endswith("_proj.bias"))
    torch.testing.assert_close(logits(load(out)), logits(load(dense)), rtol=1e-4, atol=1e-4)


def test_a_qwen2_base_sliding_window_reaches_the_qwen2_moe(fx: Path, tmp_path: Path) -> None:
    """Qwen2 windows layers from `max_window_layers` on, Qwen2-MoE's own rule the odd ones below it: the
    output states the base's `layer_types`, so a window of 4 over the 10-token prompt computes the same."""
    windowed = tmp_path / "windowed"
    windowed.mkdir()
    config = json.loads((fx / "qwen2-base" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k != "layer_types"}
    (windowed / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 4,
                                                      "max_window_layers": 2}))
    (windowed / "model.safetensors").symlink_to(fx / "qwen2-base" / "model.safetensors")
    out = tmp_path / "out"
    run_merge(moe_yaml(windowed, [windowed, windowed], windowed, 0.0), out, device="cpu")
    written = json.loads((out / "config.json").read_text())
    assert written["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    dense = logits(load(windowed))
    torch.testing.assert_close(logits(load(out)), dense, rtol=1e-4, atol=1e-4)
    assert (dense - logits(load(fx / "qwen2-base"))).abs().max() > 1e-2  # the window matters here


@pytest.fixture(scope="module")
def qwen3_dense(tmp_path_factory) -> Path:
    """A tiny random Qwen3 (QK norms, explicit head_dim), saved by transformers in float32."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=64)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so copying the wrong one would show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("qwen3") / "dense"
    model.save_pretrained(out)
    return out


def test_qwen3_moe_of_identical_experts_reproduces_the_dense_qwen3(qwen3_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_merge(moe_yaml(qwen3_dense, [qwen3_dense] * 3, experts_per_token=2), out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 3
    assert config["moe_intermediate_size"] == 96 and config["head_dim"] == 16
    written = tensors(out)
    assert written["model.layers.1.mlp.gate.weight"].shape == (3, 64)
    assert not any("shared" in name for name in written)
    moe = load(out)
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    torch.testing.assert_close(logits(moe, SMALL_PROMPT), logits(load(qwen3_dense), SMALL_PROMPT), rtol=1e-4, atol=1e-4)


def test_routers_and_shared_gates_are_drawn_from_the_seed_and_layer(fx: Path, tmp_path: Path) -> None:
    """Routers draw from (seed, layer) as in a Mixtral; the shared gate from its own stream, so it is no router row."""
    from merger.execute.router import gate_weights

    q = fx / "qwen2-base"
    run_merge(moe_yaml(q, [q, q], q, seed=3), tmp_path / "a", device="cpu")
    written = tensors(tmp_path / "a")
    for layer in range(4):
        router, shared = written[f"model.layers.{layer}.mlp.gate.weight"], written[f"model.layers.{layer}.mlp.shared_expert_gate.weight"]
        assert torch.equal(router, gate_weights("random", (2, 128), 3, layer).to(torch.bfloat16))
        assert torch.equal(shared, gate_weights("random", (1, 128), 3, layer, shared=True).to(torch.bfloat16))
        assert not torch.equal(shared[0], router[0])


# ---------------------------------------------------------------- refusals, each naming what cannot be represented

def refusal(text: str, tmp_path: Path) -> MergerError:
    out = tmp_path / "out"
    with pytest.raises(MergerError) as caught:
        run_merge(text, out, device="cpu")
    assert not out.exists()
    return caught.value


def test_qwen2_experts_without_a_shared_expert_are_refused_with_the_fix(fx: Path, tmp_path: Path) -> None:
    q = fx / "qwen2-base"
    error = refusal(moe_yaml(q, [q, q]), tmp_path)
    assert isinstance(error, ArchitectureError)
    assert "a Qwen2-MoE takes 1 `shared_experts` entry" in str(error) and "a Mixtral is built from llama or mistral" in str(error)


def test_qwen2_experts_into_a_mixtral_are_refused_by_family(fx: Path, tmp_path: Path) -> None:
    q = fx / "qwen2-base"
    error = refusal(moe_yaml(q, [q, q], architecture="mixtral"), tmp_path)
    assert isinstance(error, ArchitectureError) and "a Mixtral is built from llama or mistral models" in str(error)


def test_a_mistral_sliding_window_is_refused_in_a_qwen2_moe(fx: Path, tmp_path: Path) -> None:
    """The fixtures' Mistral slides a window of 256; a Qwen2-MoE config built from it would not."""
    m = fx / "mistral-code"
    error = refusal(moe_yaml(m, [m, m], m, architecture="qwen"), tmp_path)
    assert isinstance(error, ArchitectureSettingError)
    assert "window of 256 over 4 of its 4 layers" in str(error) and "sliding_window" in str(error)


def test_a_class_settings_refusal_comes_from_planning_and_from_the_merge(fx: Path, tmp_path: Path) -> None:
    """Validation plans with the class settings run (before any weight is read); the engine runs them beside
    the merge, which stops on the same refusal and leaves no file, staging folder included."""
    from merger.config.load import load_config
    from merger.plan.entry import plan_config

    m = fx / "mistral-code"
    text = moe_yaml(m, [m, m], m, architecture="qwen")
    plan, _ = plan_config(load_config(text), None, settle=False)
    assert plan.class_settings is not None and "layer_types" not in plan.output_config
    with pytest.raises(ArchitectureSettingError) as planned:
        plan_config(load_config(text), None)
    assert str(refusal(text, tmp_path)) == str(planned.value)
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_beside_the_merge_stops_it_at_the_next_tensor(fx: Path, tmp_path: Path, monkeypatch) -> None:
    """The class settings refuse while the first tensor is taken: no further tensor is merged.

    The merge is held where it takes its first tensor (its first cancel check) until the refusal is on
    record, so that the count does not depend on how soon the child answers."""
    import threading
    import time

    from merger.plan.settings import ClassSettings

    refused = threading.Event()
    real_refuse = ClassSettings.refuse

    def resolve(self, output_config: dict) -> tuple[dict, tuple[str, ...]]:  # in the child process
        return dict(output_config), ("refused for this test",)

    def refuse(self, refusals: tuple[str, ...]) -> None:  # back in this one
        refused.set()
        real_refuse(self, refusals)

    checks = []

    def should_cancel() -> bool:  # asked only while the refusal is not on record (maybe never)
        checks.append(1)
        if len(checks) == 1:
            assert refused.wait(30)
            time.sleep(1.0)  # for the files thread to record it (microseconds, unless the machine is loaded)
        return False

    merged = []
    monkeypatch.setattr(ClassSettings, "resolve", resolve)
    monkeypatch.setattr(ClassSettings, "refuse", refuse)
    m = fx / "mistral-base"
    with pytest.raises(ArchitectureSettingError, match="refused for this test"):
        run_merge(moe_yaml(m, [m, m]), tmp_path / "out", device="cpu", should_cancel=should_cancel,
                  progress=lambda fraction, name: merged.append(name))
    assert len(checks) <= 1 and len(merged) <= 1  # the tensor taken before the refusal was known, of dozens
    assert list(tmp_path.iterdir()) == []


_SETTLE_APART = """
import sys
from merger.config.load import load_config
from merger.plan.entry import plan_config, settled, settling_apart

plan, _ = plan_config(load_config(sys.stdin.read()), None, settle=False)
with settling_apart(plan) as settle:
    apart = settle()
print("rope_theta stated:", apart.output_config.get("rope_theta"), "before:", plan.output_config.get("rope_theta"))
print("Mistral's class here after the child:", "transformers.models.mistral.configuration_mistral" in sys.modules)
here = settled(plan)
print("Mistral's class here after settled:", "transformers.models.mistral.configuration_mistral" in sys.modules)
print("same plan:", apart == here and apart.class_settings is None)
"""


def test_the_engine_runs_the_class_settings_in_a_child_process_with_the_same_result(fx: Path, tmp_path: Path) -> None:
    """The step's imports (the base's config class) happen in a child process, not in the merging one, and its
    result is the same: here the base leaves `rope_theta` to Mistral's default (10000), which the Mixtral
    output must state (its class's default is 1e6)."""
    import shutil
    import subprocess
    import sys

    base = shutil.copytree(fx / "mistral-base", tmp_path / "mistral-base")
    config = json.loads((base / "config.json").read_text())
    del config["rope_theta"], config["rope_parameters"]
    (base / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-c", _SETTLE_APART], input=moe_yaml(base, [base, base]),
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert result.stdout.splitlines() == [
        "rope_theta stated: 10000.0 before: None", "Mistral's class here after the child: False",
        "Mistral's class here after settled: True", "same plan: True",
    ], result.stderr


_CLI_FORKS_FIRST = """
import runpy, sys
from merger.plan.settings_process import SettingsProcess

forked = SettingsProcess.start.__func__

def start(cls):
    print("torch imported as the settings process forks:", "torch" in sys.modules)
    return forked(cls)

SettingsProcess.start = classmethod(start)
sys.argv = ["merger", *sys.argv[1:]]
try:
    runpy.run_module("merger", run_name="__main__")
finally:
    print("Mistral's class imported here:", "transformers.models.mistral.configuration_mistral" in sys.modules)
"""


def test_the_command_line_forks_an_moe_s_settings_process_before_importing_torch(fx: Path, tmp_path: Path) -> None:
    """`python -m merger run` of an MoE forks the class settings' process before torch is imported (its imports
    then run beside this process's), and the output states what the base leaves to its class: Mistral's
    `rope_theta` default (10000), which the Mixtral output's class would read as 1e6."""
    import shutil
    import subprocess
    import sys

    base = shutil.copytree(fx / "mistral-base", tmp_path / "mistral-base")
    config = json.loads((base / "config.json").read_text())
    del config["rope_theta"], config["rope_parameters"]
    (base / "config.json").write_text(json.dumps(config))
    (tmp_path / "moe.yml").write_text(moe_yaml(base, [base, base]))
    result = subprocess.run([sys.executable, "-c", _CLI_FORKS_FIRST, "run", str(tmp_path / "moe.yml"), str(tmp_path / "out"),
                             "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert [line for line in result.stdout.splitlines() if not line.startswith("wrote ")] == [
        "torch imported as the settings process forks: False", "Mistral's class imported here: False",
    ], result.stderr
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["MixtralForCausalLM"] and written["rope_theta"] == 10000.0


def test_a_settings_process_started_early_is_killed_when_the_plan_needs_none(fx: Path) -> None:
    """A plan with nothing to settle (an output of the base's own class): the process the command line forked
    is killed at once, not left importing beside the merge."""
    from merger.plan.entry import plan_config, settling_apart
    from merger.plan.settings_process import SettingsProcess

    m = fx / "llama-code"
    plan, _ = plan_config(load_config(moe_yaml(m, [m, m])), None, settle=False)
    process = SettingsProcess.start()
    with settling_apart(replace(plan, class_settings=None), process) as settle:
        assert not process._process.is_alive() and settle().class_settings is None


@pytest.mark.parametrize("child", ["dies", "hangs"])
def test_class_settings_run_here_when_the_child_does_not_answer(fx: Path, monkeypatch, child: str) -> None:
    import os
    import time

    from merger.plan import entry, settings_process

    monkeypatch.setattr(settings_process, "_serve", lambda *args: os._exit(1) if child == "dies" else time.sleep(600))
    monkeypatch.setattr(entry, "SETTLE_CHILD_TIMEOUT_S", 1.0)
    m = fx / "llama-code"
    plan, _ = entry.plan_config(load_config(moe_yaml(m, [m, m])), None, settle=False)
    started = time.monotonic()
    with entry.settling_apart(plan) as settle:
        assert settle() == entry.settled(plan)
    assert time.monotonic() - started < 60  # the hung child was killed on exit, not waited for


def test_ctrl_c_is_left_to_the_merging_process_not_the_class_settings_child(fx: Path, monkeypatch) -> None:
    """A terminal's Ctrl-C reaches the child too: it must still answer (the parent stops, and kills it)."""
    import os
    import signal

    from merger.plan import entry
    from merger.plan.settings import ClassSettings

    parent = os.getpid()

    def resolve(self, output_config: dict) -> tuple[dict, tuple[str, ...]]:
        if os.getpid() == parent:
            return {"computed": "here"}, ()
        os.kill(os.getpid(), signal.SIGINT)
        return {"computed": "in the child"}, ()

    monkeypatch.setattr(ClassSettings, "resolve", resolve)
    m = fx / "llama-code"
    plan, _ = entry.plan_config(load_config(moe_yaml(m, [m, m])), None, settle=False)
    with entry.settling_apart(plan) as settle:
        assert settle().output_config == {"computed": "in the child"}


def test_deepseek_is_refused_with_its_reason(fx: Path, tmp_path: Path) -> None:
    m = fx / "llama-code"
    for name in ("deepseek", "deepseek_v3"):
        error = refusal(moe_yaml(m, [m, m], m, architecture=name), tmp_path)
        assert isinstance(error, ArchitectureError) and "multi-head latent attention" in str(error)


def test_a_shared_expert_in_a_mixtral_is_refused(fx: Path, tmp_path: Path) -> None:
    m = fx / "llama-code"
    error = refusal(moe_yaml(m, [m, m], m, architecture="mixtral"), tmp_path)
    assert "a Mixtral takes no `shared_experts` entries (as in mergekit-moe), got 1" in str(error)


def test_llama_experts_with_a_shared_expert_default_to_a_qwen2_moe(fx: Path, tmp_path: Path) -> None:
    """mergekit-moe would pick its remote-code DeepSeek here; without it the first output that fits is Qwen2-MoE."""
    from merger.validate import validate_config

    m = fx / "llama-code"
    report = validate_config(moe_yaml(m, [m, fx / "llama-prose"], fx / "llama-base"))
    assert report.architecture == "Qwen2MoeForCausalLM"
    assert str(fx / "llama-base") in report.models  # the shared expert's model is fetched and listed


def test_expert_mlp_biases_are_refused_by_name(fx: Path, tmp_path: Path) -> None:
    """An expert's MLP tensor that no expert slot holds (a bias) would be dropped silently."""
    from safetensors.torch import save_file

    q = fx / "qwen2-base"
    biased = tmp_path / "biased"
    biased.mkdir()
    (biased / "config.json").write_text((q / "config.json").read_text())
    extra = {f"model.layers.{i}.mlp.up_proj.bias": torch.zeros(384, dtype=torch.bfloat16) for i in range(4)}
    save_file({**tensors(q), **extra}, str(biased / "model.safetensors"))
    error = refusal(moe_yaml(q, [q, biased], q), tmp_path)
    assert isinstance(error, UnmergedTensorsError)
    assert "`experts[1]`" in str(error) and "4 tensor(s) a Qwen2-MoE output cannot hold" in str(error)
    assert "model.layers.0.mlp.up_proj.bias" in str(error)


def test_qwen3_base_tensors_are_refused_by_a_qwen2_moe(qwen3_dense: Path, tmp_path: Path) -> None:
    error = refusal(moe_yaml(qwen3_dense, [qwen3_dense] * 2, qwen3_dense, architecture="qwen2_moe"), tmp_path)
    assert isinstance(error, ArchitectureError) and "a Qwen2-MoE is built from qwen2 or llama or mistral models" in str(error)


@pytest.mark.parametrize("extra, words", [
    ("architecture: switch\n", ["architecture: switch", "names no MoE output"]),
    ("shared_experts:\n  - source_model: a/b\n  - source_model: a/c\n", ["shared_experts", "lists 2", "keep one"]),
])
def test_schema_names_unknown_outputs_and_extra_shared_experts(extra: str, words: list[str]) -> None:
    with pytest.raises(MergerError) as caught:
        load_config("base_model: a/b\ngate_mode: random\nexperts:\n  - source_model: a/b\n  - source_model: a/c\n" + extra)
    assert all(w in str(caught.value) for w in words), str(caught.value)


# ---------------------------------------------------------------- output settings, from config.json alone

MISTRAL = dict(model_type="mistral", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
               intermediate_size=512, vocab_size=1000, sliding_window=4096)


def test_settings_left_to_class_defaults_are_stated_or_read_as_computed() -> None:
    """Mistral-7B's config.json states no head_dim (both classes compute hidden / heads); one without
    rope_theta or rms_norm_eps means Mistral's defaults, which Mixtral's differ from: the output states them."""
    from merger.plan.settings import output_refusals, state_class_defaults

    mixtral = {**MISTRAL, "model_type": "mixtral", "num_local_experts": 2}
    assert len(output_refusals(MISTRAL, mixtral)) == 2  # rope_theta 1e4 vs 1e6, rms_norm_eps 1e-6 vs 1e-5
    stated = state_class_defaults(MISTRAL, mixtral)
    assert stated["rms_norm_eps"] == 1e-6 and stated["rope_theta"] == 10000.0 and "head_dim" not in stated
    assert output_refusals(MISTRAL, stated) == ()
    refusals = output_refusals(MISTRAL, {**stated, "head_dim": 32})
    assert len(refusals) == 1 and "`head_dim: 64`" in refusals[0] and "reads it as 32" in refusals[0]
    full = {**MISTRAL, "rope_theta": 1e6, "rms_norm_eps": 1e-5}
    assert state_class_defaults(full, {**full, "model_type": "mixtral"}) == {**full, "model_type": "mixtral"}


def test_a_qwen2_window_carries_over_and_a_mistral_window_does_not() -> None:
    from merger.plan.settings import output_refusals, state_class_defaults

    qwen2 = dict(MISTRAL, model_type="qwen2", use_sliding_window=True, max_window_layers=2, sliding_window=64)
    moe = {**qwen2, "model_type": "qwen2_moe", "num_experts": 2}
    refusals = output_refusals(qwen2, moe)  # Qwen2 windows layers 2, 3; Qwen2-MoE's own rule would window layer 0
    assert len(refusals) == 1 and "window of 64 over 2 of its 4 layers" in refusals[0]
    types = ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert output_refusals(qwen2, {**moe, "layer_types": types}) == ()  # what the planner states
    mistral_moe = state_class_defaults(MISTRAL, {**MISTRAL, "model_type": "qwen2_moe", "num_experts": 2})
    refusals = output_refusals(MISTRAL, mistral_moe)
    assert len(refusals) == 1 and "window of 4096 over 4 of its 4 layers" in refusals[0]


def test_moe_models_merge_like_dense_ones(fx: Path, tmp_path: Path) -> None:
    """A Qwen2-MoE's experts are ordinary tensors to a merge method: a linear merge of it with itself is itself."""
    q = fx / "qwen2-base"
    run_merge(moe_yaml(q, [q, fx / "qwen2-code"], fx / "qwen2-prose", 0.5), tmp_path / "moe", device="cpu")
    moe = tmp_path / "moe"
    run_merge(f"merge_method: linear\nmodels:\n  - model: {moe}\n    parameters: {{weight: 1}}\n"
              f"  - model: {moe}\n    parameters: {{weight: 1}}\n", tmp_path / "merged", device="cpu")
    merged, original = tensors(tmp_path / "merged"), tensors(moe)
    assert merged.keys() == original.keys() and "model.layers.3.mlp.experts.1.up_proj.weight" in merged
    assert all(torch.equal(merged[n], original[n]) for n in original)
