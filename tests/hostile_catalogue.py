"""Hostile and broken configs as data: each entry is refused with a named error, quickly, in few words.

Reusable by any test that feeds configs to an entry point (`load_config`, `merger validate`, the app's
validate/submit endpoints, share links). To add a case, append a :class:`Hostile` to :data:`CATALOGUE`.

`via` says how the entry reaches the parser:
- `config`: `text` is the config YAML, as pasted or submitted;
- `link`: `text` is the YAML packed into a share link payload *without* `encode_config`'s own checks
  (as an attacker would craft it), then opened with `decode_config`;
- `payload`: `text` is the raw `?config=` payload itself.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

from merger.errors import (
    ChatTemplateError,
    ConfigError,
    ConfigTooLargeError,
    InvalidYamlError,
    ListTooLongError,
    MultiDocumentError,
    StageError,
    NestingTooDeepError,
    ParameterValueError,
    StringTooLongError,
    TokenInConfigError,
    UnknownMethodError,
    YamlAliasError,
)


@dataclass(frozen=True)
class Hostile:
    """One hostile input.

    Attributes:
        id: a short name for the test id.
        category: what kind of attack or mistake it is (for the counts in reports).
        text: the config YAML (or the link payload, see `via`).
        error: the exact error class it must be refused with.
        via: `config`, `link` or `payload` (see the module docstring).
    """

    id: str
    category: str
    text: str
    error: type
    via: str = "config"


def pack(yaml_text: str) -> str:
    """A share-link payload for `yaml_text`, built like `encode_config` but without its checks."""
    return base64.urlsafe_b64encode(zlib.compress(yaml_text.encode("utf-8"), 9)).decode("ascii").rstrip("=")


FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"  # shaped like a token, not one
SLERP = "merge_method: slerp\nbase_model: org/a\nmodels:\n  - model: org/a\n  - model: org/b\n"
LINEAR = "merge_method: linear\nmodels:\n  - model: org/a\n    parameters: {{weight: {w}}}\n  - model: org/b\n    parameters: {{weight: 0.5}}\n"
TASK = ("merge_method: {method}\nbase_model: org/base\nmodels:\n  - model: org/a\n"
        "    parameters: {{weight: 1.0, {params}}}\nparameters: {{{globals}}}\n")
MOE = "base_model: org/base\ngate_mode: random\nexperts:\n  - source_model: org/a\n  - source_model: org/b\n"
KARCHER = "merge_method: karcher\nmodels:\n  - model: org/a\n  - model: org/b\nparameters: {{{params}}}\n"


def _slerp(t: str) -> str:
    return SLERP + f"parameters:\n  t: {t}\n"


def _task(method: str = "ties", params: str = "density: 0.5", globals_: str = "") -> str:
    return TASK.format(method=method, params=params, globals=globals_)


def _laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return SLERP + "\n".join(lines) + "\n"


def _merge_bomb(levels: int) -> str:
    lines = ["m0: &m0 {x: 1}"]
    lines += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], y{i}: 1}}" for i in range(1, levels)]
    return SLERP + "\n".join(lines) + "\n"


def _alias_depth() -> str:
    deep = "[" * 30 + "1" + "]" * 30
    return SLERP + f"a: &a {deep}\nb: &b {'[' * 29}*a{']' * 29}\n"


def _block_nesting(levels: int) -> str:
    return SLERP + "x:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(levels)) + "  " * (levels + 1) + "v: 1\n"


def _models(count: int) -> str:
    return "merge_method: linear\nmodels:\n" + "".join(f"  - {{model: org/m{i}, parameters: {{weight: 1}}}}\n" for i in range(count))


def _slices(count: int) -> str:
    return "merge_method: passthrough\nslices:\n" + "".join(
        "  - sources: [{model: org/a, layer_range: [0, 1]}]\n" for _ in range(count))


DEEP_JINJA = "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"

CATALOGUE: list[Hostile] = [
    # ---- YAML alias bombs
    Hostile("billion-laughs", "alias bomb", _laughs(9), YamlAliasError),
    Hostile("laughs-small-levels", "alias bomb", _laughs(6), YamlAliasError),
    Hostile("too-many-aliases", "alias bomb", SLERP + "a: &a 1\nb: [" + ",".join(["*a"] * 101) + "]\n", YamlAliasError),
    Hostile("recursive-alias", "alias bomb", SLERP + "a: &a [1, *a]\n", YamlAliasError),
    Hostile("merge-key-bomb", "alias bomb", _merge_bomb(24), YamlAliasError),
    Hostile("alias-deepens-nesting", "depth", _alias_depth(), NestingTooDeepError),
    # ---- nesting depth
    Hostile("20000-brackets", "depth", "merge_method: slerp\nx: " + "[" * 20_000 + "]" * 20_000 + "\n", NestingTooDeepError),
    Hostile("20000-braces", "depth", "x: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n", NestingTooDeepError),
    Hostile("unclosed-brackets", "depth", "x: " + "[" * 20_000 + "\n", NestingTooDeepError),
    Hostile("block-nesting-40", "depth", _block_nesting(40), NestingTooDeepError),
    # ---- size and lengths
    Hostile("300-KiB-comment", "size", SLERP + "# " + "x" * 300_000 + "\n", ConfigTooLargeError),
    Hostile("5-MB-unknown-key", "size", SLERP + "surprise: " + "y" * 5_000_000 + "\n", ConfigTooLargeError),
    Hostile("12000-values", "size", SLERP + "x: [" + ",".join(["[1,1,1,1,1]"] * 2000) + "]\n", ConfigTooLargeError),
    Hostile("5000-item-list", "size", SLERP + "x: [" + ",".join(["1"] * 5000) + "]\n", ListTooLongError),
    Hostile("200-models", "size", _models(200), ListTooLongError),
    Hostile("600-slices", "size", _slices(600), ListTooLongError),
    Hostile("200-experts", "size", "base_model: org/base\ngate_mode: random\nexperts:\n"
            + "".join(f"  - source_model: org/e{i}\n" for i in range(200)), ListTooLongError),
    Hostile("300-prompts", "size", "base_model: org/base\ngate_mode: random\nexperts:\n  - source_model: org/a\n"
            "    positive_prompts: [" + ",".join(["hi"] * 300) + "]\n  - source_model: org/b\n", ListTooLongError),
    Hostile("1100-tokens", "size", SLERP + "parameters: {t: 0.5}\ntokenizer:\n  tokens:\n"
            + "".join(f"    tok{i}: {{source: org/a}}\n" for i in range(1100)), ListTooLongError),
    Hostile("300-point-gradient", "size", _slerp("[" + ",".join(["0.5"] * 300) + "]"), ListTooLongError),
    Hostile("10000-char-name", "size", _slerp("0.5") + "name: " + "n" * 10_000 + "\n", StringTooLongError),
    Hostile("200-char-key", "size", _slerp("0.5") + "k" * 200 + ": 1\n", StringTooLongError),
    Hostile("1000-char-model", "size", "merge_method: slerp\nbase_model: org/a\nmodels:\n  - model: org/a\n"
            f"  - model: org/{'b' * 1000}\nparameters: {{t: 0.5}}\n", StringTooLongError),
    Hostile("70000-char-template", "size", _slerp("0.5") + "chat_template: '{{ x }}" + "y" * 70_000 + "'\n",
            StringTooLongError),
    # ---- several documents, broken YAML
    # multi-stage configs (mergekit-multi) run; these break its rules
    Hostile("two-documents-unnamed", "multi-document", SLERP + "---\n" + SLERP, StageError),
    Hostile("17-stages", "multi-document", "---\n".join(f"name: s{i}\n" + SLERP for i in range(17)), MultiDocumentError),
    Hostile("stage-naming-itself", "multi-document", "name: a\nmerge_method: linear\nmodels: [{model: a}]\n", StageError),
    Hostile("duplicate-stage-names", "multi-document", "name: a\n" + SLERP + "---\nname: a\n" + SLERP, StageError),
    Hostile("python-tag", "yaml", SLERP + "x: !!python/object/apply:os.system ['true']\n", InvalidYamlError),
    Hostile("unclosed-flow", "yaml", "merge_method: slerp\nmodels: [unclosed\n", InvalidYamlError),
    Hostile("bad-date", "yaml", SLERP + "x: 2024-13-45\n", InvalidYamlError),
    Hostile("lone-surrogate", "yaml", SLERP + "name: \ud800\n", InvalidYamlError),
    Hostile("nul-character", "yaml", SLERP + "name: a\x00b\n", InvalidYamlError),
    Hostile("duplicate-anchor", "yaml", SLERP + "a: &x 1\nb: &x 2\nc: *x\n", InvalidYamlError),
    # ---- Hub tokens
    Hostile("token-in-comment", "token", SLERP + f"# my token: {FAKE_TOKEN}\n", TokenInConfigError),
    Hostile("token-as-model", "token", f"merge_method: linear\nmodels:\n  - model: {FAKE_TOKEN}\n", TokenInConfigError),
    Hostile("token-escaped", "token", _slerp("0.5") + 'name: "\\x68f_' + FAKE_TOKEN[3:] + '"\n', TokenInConfigError),
    Hostile("oauth-token", "token", _slerp("0.5") + "# hf_oauth_" + "Z" * 30 + "\n", TokenInConfigError),
    # ---- chat templates
    Hostile("template-abs-path", "template", _slerp("0.5") + "chat_template: /etc/passwd\n", ChatTemplateError),
    Hostile("template-dotdot", "template", _slerp("0.5") + "chat_template: ../../templates/chat_templates/chatml\n",
            ChatTemplateError),
    Hostile("template-missing-file", "template", _slerp("0.5") + "chat_template: /no/such/file.jinja\n", ChatTemplateError),
    Hostile("template-unknown-name", "template", _slerp("0.5") + "chat_template: chatml2\n", ChatTemplateError),
    Hostile("template-broken-for", "template", _slerp("0.5") + "chat_template: '{% for m in %}{% endfor %}'\n",
            ChatTemplateError),
    Hostile("template-unclosed", "template", _slerp("0.5") + "chat_template: '{{ messages'\n", ChatTemplateError),
    Hostile("template-deep-parens", "template", _slerp("0.5") + f"chat_template: '{DEEP_JINJA}'\n", ChatTemplateError),
    # ---- parameters: NaN, inf, types, ranges
    Hostile("t-nan", "parameter", _slerp(".nan"), ParameterValueError),
    Hostile("t-inf", "parameter", _slerp(".inf"), ParameterValueError),
    Hostile("t-1.5", "parameter", _slerp("1.5"), ParameterValueError),
    Hostile("t-true", "parameter", _slerp("true"), ParameterValueError),
    Hostile("t-abc", "parameter", _slerp("abc"), ParameterValueError),
    Hostile("t-gradient-nan", "parameter", _slerp("[0, .nan, 1]"), ParameterValueError),
    Hostile("t-filter-2", "parameter", _slerp("[{filter: self_attn, value: 2}, {value: 0.5}]"), ParameterValueError),
    Hostile("weight-inf", "parameter", LINEAR.format(w=".inf"), ParameterValueError),
    Hostile("weight-minus-inf", "parameter", LINEAR.format(w="-.inf"), ParameterValueError),
    Hostile("weight-1e300", "parameter", LINEAR.format(w="1e300"), ParameterValueError),
    Hostile("weight-string", "parameter", LINEAR.format(w="heavy"), ParameterValueError),
    Hostile("weight-filter-gradient-inf", "parameter", LINEAR.format(w="[{filter: mlp, value: [0, .inf]}, {value: 1}]"),
            ParameterValueError),
    Hostile("normalize-2", "parameter", LINEAR.format(w="1") + "parameters: {normalize: 2}\n", ParameterValueError),
    Hostile("lambda-x", "parameter", _task("task_arithmetic", "weight: 1", "lambda: x"), ParameterValueError),
    Hostile("lambda-nan", "parameter", _task("task_arithmetic", "weight: 1", "lambda: .nan"), ParameterValueError),
    Hostile("density-1.5", "parameter", _task("ties", "density: 1.5"), ParameterValueError),
    Hostile("density-negative", "parameter", _task("dare_ties", "density: -0.1"), ParameterValueError),
    Hostile("della-epsilon-negative", "parameter", _task("della", "density: 0.5, epsilon: -1"), ParameterValueError),
    Hostile("breadcrumbs-gamma-2", "parameter", _task("breadcrumbs", "density: 0.5, gamma: 2"), ParameterValueError),
    Hostile("normalize-yes", "parameter", _task("ties", "density: 0.5", "normalize: 'yes'"), ParameterValueError),
    Hostile("max-iter-negative", "parameter", KARCHER.format(params="max_iter: -5"), ParameterValueError),
    Hostile("max-iter-fraction", "parameter", KARCHER.format(params="max_iter: 2.5"), ParameterValueError),
    Hostile("tol-nan", "parameter", KARCHER.format(params="tol: .nan"), ParameterValueError),
    Hostile("select-topk-2", "parameter", "merge_method: sce\nbase_model: org/base\nmodels:\n  - model: org/a\n"
            "parameters: {select_topk: 2}\n", ParameterValueError),
    Hostile("multislerp-eps-negative", "parameter", "merge_method: multislerp\nmodels:\n"
            "  - {model: org/a, parameters: {weight: 1}}\nparameters: {eps: -1}\n", ParameterValueError),
    Hostile("nearswap-t-negative", "parameter", "merge_method: nearswap\nbase_model: org/a\nmodels:\n"
            "  - model: org/b\nparameters: {t: -1}\n", ParameterValueError),
    Hostile("passthrough-scale-inf", "parameter", "merge_method: passthrough\nslices:\n  - sources:\n"
            "      - {model: org/a, layer_range: [0, 2], parameters: {scale: .inf}}\n", ParameterValueError),
    Hostile("pad-to-0", "parameter", _slerp("0.5") + "tokenizer: {source: base, pad_to_multiple_of: 0}\n", ParameterValueError),
    Hostile("pad-to-1e8", "parameter", _slerp("0.5") + "tokenizer: {source: base, pad_to_multiple_of: 100000000}\n",
            ParameterValueError),
    Hostile("seed-negative", "parameter", _slerp("0.5") + "seed: -1\n", ParameterValueError),
    Hostile("seed-1e30", "parameter", _slerp("0.5") + "seed: 1e30\n", ParameterValueError),
    Hostile("layer-range-huge", "parameter", "merge_method: passthrough\nslices:\n"
            "  - sources: [{model: org/a, layer_range: [0, 100000000]}]\n", ParameterValueError),
    Hostile("layer-range-bool", "parameter", "merge_method: passthrough\nslices:\n"
            "  - sources: [{model: org/a, layer_range: [true, 2]}]\n", ParameterValueError),
    Hostile("residual-weight-nan", "parameter", "merge_method: passthrough\nslices:\n"
            "  - sources: [{model: org/a, layer_range: [0, 2]}]\n    residual_weight: .nan\n", ParameterValueError),
    Hostile("experts-per-token-1000", "parameter", MOE + "experts_per_token: 1000\n", ParameterValueError),
    Hostile("experts-per-token-true", "parameter", MOE + "experts_per_token: true\n", ParameterValueError),
    Hostile("residual-scale-nan", "parameter", MOE.replace("source_model: org/b", "source_model: org/b\n    residual_scale: .nan"),
            ParameterValueError),
    Hostile("hidden-gate-without-prompts", "parameter", MOE.replace("gate_mode: random", "gate_mode: hidden"), ConfigError),
    Hostile("cheap-embed-same-prompts-for-all", "parameter", MOE.replace("gate_mode: random", "gate_mode: cheap_embed")
            .replace("source_model: org/a", "source_model: org/a\n    positive_prompts: [hi]")
            .replace("source_model: org/b", "source_model: org/b\n    positive_prompts: [hi]"), ConfigError),
    Hostile("noise-scale-inf", "parameter", MOE.replace("source_model: org/b", "source_model: org/b\n    noise_scale: .inf"),
            ParameterValueError),
    # ---- echoed input stays short and inert
    Hostile("unknown-key-markdown", "echo", _slerp("0.5") + "surprise: '" + "`)](http://evil.example) **x** " * 100 + "'\n",
            ConfigError),
    Hostile("model-dict-without-model", "echo", "merge_method: linear\nmodels:\n  - model: {revision: " + "r" * 3000
            + "}\n", ConfigError),
    Hostile("method-name-3000", "echo", "merge_method: " + "m" * 3000 + "\nmodels: [{model: org/a}]\n", UnknownMethodError),
    # ---- share links
    Hostile("link-billion-laughs", "link", _laughs(9), YamlAliasError, via="link"),
    Hostile("link-20000-brackets", "link", "x: " + "[" * 20_000 + "]" * 20_000 + "\n", NestingTooDeepError, via="link"),
    Hostile("link-token", "link", _slerp("0.5") + f"# {FAKE_TOKEN}\n", TokenInConfigError, via="link"),
    Hostile("link-zip-bomb", "link", pack("#" * 5_000_000), ConfigError, via="payload"),
    Hostile("link-oversize-payload", "link", "A" * 100_000, ConfigError, via="payload"),
    Hostile("link-not-base64", "link", "<script>alert(1)</script>", ConfigError, via="payload"),
]

