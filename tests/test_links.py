"""Share links: config YAML <-> URL payload."""

import base64
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest

from merger.errors import ConfigError
from merger.links import MAX_YAML_BYTES, decode_config, encode_config, share_url

SLERP = """merge_method: slerp
base_model: mistralai/Mistral-7B-Instruct-v0.1
slices:
  - sources:
      - model: mistralai/Mistral-7B-Instruct-v0.1
        layer_range: [0, 32]
      - model: mistralai/Mistral-7B-Instruct-v0.2
        layer_range: [0, 32]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""
MOE = """base_model: mistralai/Mistral-7B-Instruct-v0.2
gate_mode: random
experts_per_token: 2
experts:
  - source_model: mistralai/Mistral-7B-Instruct-v0.1
  - source_model: mistralai/Mistral-7B-Instruct-v0.2
"""
UNICODE = """# Fusión de modelos: 模型合并 🚀 — «quotes» & ümlauts
merge_method: linear
models:
  - model: org/Ünïcødé-モデル
    parameters: {weight: 0.5}
  - model: org/other
    parameters: {weight: 0.5}
name: "naïve merge ✨"
"""
WINDOWS_NEWLINES = "merge_method: passthrough\r\nslices:\r\n  - sources: [{model: a/b, layer_range: [0, 2]}]\r\n"


@pytest.mark.parametrize("text", [SLERP, MOE, UNICODE, WINDOWS_NEWLINES, "", "# " + "x" * 50_000])
def test_round_trip_is_byte_exact(text: str) -> None:
    payload = encode_config(text)
    assert decode_config(payload) == text
    # URL-safe, unpadded: nothing that needs escaping in a query string
    assert set(payload) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_payload_is_zlib_then_urlsafe_base64_without_padding() -> None:
    payload = encode_config(SLERP)
    assert "=" not in payload
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert zlib.decompress(raw).decode("utf-8") == SLERP
    assert len(payload) < len(SLERP)  # compression pays off on a real config


def test_share_url_carries_only_the_config() -> None:
    url = share_url("https://alice-merger.hf.space/?job=abc&token=hf_secret#frag", SLERP)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == ("https", "alice-merger.hf.space", "/", "")
    query = parse_qs(parts.query)
    assert list(query) == ["config"]
    assert decode_config(query["config"][0]) == SLERP


def test_share_url_keeps_a_sub_path_and_adds_a_slash_to_a_bare_host() -> None:
    assert share_url("http://127.0.0.1:7860", MOE).startswith("http://127.0.0.1:7860/?config=")
    assert share_url("https://example.org/apps/merger/", MOE).startswith("https://example.org/apps/merger/?config=")


def test_a_link_never_contains_a_token() -> None:
    token = "hf_" + "A1b2C3d4E5" * 4
    # the API takes no token at all: only YAML goes in ...
    url = share_url("https://x.hf.space/", SLERP)
    assert "hf_" not in decode_config(parse_qs(urlsplit(url).query)["config"][0])
    # ... and a YAML that carries one is refused rather than shared
    with pytest.raises(ConfigError, match="token"):
        encode_config(SLERP + f"# my token: {token}\n")
    with pytest.raises(ConfigError, match="token"):
        share_url("https://x.hf.space/", f"merge_method: linear\nname: {token}\n")


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "   ",
        "not base64 at all!",
        "abc$%^",
        encode_config(SLERP)[:-12],  # cut short
        encode_config(SLERP)[:20],
        "A" * 40,  # base64 of zeros: not zlib
        base64.urlsafe_b64encode(b"plain text, not compressed").decode().rstrip("="),
        base64.urlsafe_b64encode(zlib.compress(b"\xff\xfe not utf-8")).decode().rstrip("="),
    ],
)
def test_damaged_payload_raises_a_config_error(payload: str) -> None:
    with pytest.raises(ConfigError, match="the shared link is damaged"):
        decode_config(payload)


def test_altered_payload_is_damaged_or_differs() -> None:
    payload = encode_config(SLERP)
    middle = len(payload) // 2
    altered = payload[:middle] + ("A" if payload[middle] != "A" else "B") + payload[middle + 1 :]
    try:
        assert decode_config(altered) != SLERP
    except ConfigError as err:
        assert "the shared link is damaged" in str(err)


def test_a_decompression_bomb_is_refused() -> None:
    bomb = base64.urlsafe_b64encode(zlib.compress(b"a" * (MAX_YAML_BYTES + 10), 9)).decode().rstrip("=")
    with pytest.raises(ConfigError, match="damaged"):
        decode_config(bomb)


def test_padding_is_tolerated() -> None:
    payload = encode_config(MOE)
    assert decode_config(payload + "=" * (-len(payload) % 4)) == MOE


@pytest.mark.parametrize("text, error", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)), "YamlAliasError"),
    ("a: " + "[" * 100 + "]" * 100 + "\n", "NestingTooDeepError"),
    ("# " + "x" * 300_000 + "\n", "ConfigTooLargeError"),
])
def test_a_link_the_decoder_would_refuse_is_refused_when_shared(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as made:
        encode_config(text)
    assert type(made.value).__name__ == error
    with pytest.raises(ConfigError) as opened:  # the same config, packed by hand, is refused alike when opened
        decode_config(base64.urlsafe_b64encode(zlib.compress(text.encode(), 9)).decode().rstrip("="))
    assert type(opened.value).__name__ in (error, "ConfigError")


def test_an_incompressible_config_too_long_for_a_link_is_refused_at_share_time() -> None:
    import random

    rng = random.Random(0)
    noise = "".join("# " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(78)) + "\n"
                    for _ in range(1200))  # ~97 KB: under the parser's 256 KiB, its link over 64 Ki characters
    with pytest.raises(ConfigError, match="packs into .* over a link's 65,536"):
        encode_config("merge_method: linear\n" + noise)
