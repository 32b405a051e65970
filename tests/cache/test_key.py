"""The cache key: canonical JSON, omitted members, multipart material, the hashed tuple."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cache.key import (
    KEY_VERSION,
    cache_key,
    canonical_json,
    json_material,
    multipart_material,
    partition_of_credential,
    short,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples in every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=25,
)
OBJECTS = st.dictionaries(st.text(max_size=6), JSON, max_size=5)


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same value with the members of every object in another order."""
    if isinstance(value, dict):
        items = [(k, shuffled(v, rng)) for k, v in value.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


def respelled(value: Any) -> Any:
    """The same value with every exactly representable integer as a float and every integral float
    as an integer: equal numbers, other types."""
    if isinstance(value, dict):
        return {k: respelled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [respelled(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) <= 2**53:
        return float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values (unlike ==, true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def nested(depth: int, kind: str) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value, i] if kind == "list" else {"b": value, "a": i}
    return value


# --- canonical_json


@FUZZ
@given(JSON, st.randoms(use_true_random=False))
def test_key_order_at_any_depth_does_not_matter(value: Any, rng: random.Random) -> None:
    assert canonical_json(shuffled(value, rng)) == canonical_json(value)


@FUZZ
@given(JSON)
def test_number_spelling_does_not_matter(value: Any) -> None:
    assert canonical_json(respelled(value)) == canonical_json(value)


@FUZZ
@given(JSON)
def test_canonical_json_is_json_of_an_equal_value_and_a_fixed_point(value: Any) -> None:
    encoded = canonical_json(value)
    parsed = json.loads(encoded)
    assert json_equal(parsed, value)
    assert canonical_json(parsed) == encoded


@FUZZ
@given(JSON, JSON)
def test_different_values_give_different_bytes(a: Any, b: Any) -> None:
    assert (canonical_json(a) == canonical_json(b)) == json_equal(a, b)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=6), max_size=6))
def test_flat_objects_encode_as_sorted_compact_json(value: dict[str, Any]) -> None:
    assert (
        canonical_json(value) == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )


@pytest.mark.parametrize("text", [b"0", b"0.0", b"-0.0", b"0e0", b"-0", b"0E+5", b"0.000"])
def test_zero_is_zero_however_written(text: bytes) -> None:
    assert canonical_json(orjson.loads(b'{"t":' + text + b"}")) == b'{"t":0}'
    assert canonical_json(json.loads(b'{"t":' + text + b"}")) == b'{"t":0}'


@pytest.mark.parametrize(("text", "expected"), [(b"1", b"1"), (b"1.0", b"1"), (b"1e3", b"1000"), (b"1000.00", b"1000")])
def test_integral_numbers_are_written_as_integers(text: bytes, expected: bytes) -> None:
    assert canonical_json(json.loads(text)) == expected
    assert canonical_json(orjson.loads(text)) == expected


def test_other_floats_use_the_shortest_repr() -> None:
    assert canonical_json([0.1, 1.5, -2.25, 1e-7, 0.1 + 0.2]) == b"[0.1,1.5,-2.25,1e-07,0.30000000000000004]"
    assert canonical_json(json.loads(b"0.10000000000000001")) == canonical_json(0.1)  # the same float


def test_big_integers_are_exact() -> None:
    assert canonical_json(2**64) == b"18446744073709551616"
    assert canonical_json(json.loads(b"123456789012345678901234567890")) == b"123456789012345678901234567890"
    assert canonical_json(2**53 + 1) != canonical_json(float(2**53 + 1))  # 2**53 + 1 is no float
    assert canonical_json(2.0**60) == canonical_json(2**60) == str(2**60).encode()
    assert canonical_json(1e300) == str(int(1e300)).encode()


def test_integers_too_big_for_decimal_str_neither_raise_nor_collide() -> None:
    huge = 10**5000  # more digits than str() writes by default
    assert canonical_json(huge) != canonical_json(huge + 1)
    assert canonical_json(-huge) != canonical_json(huge)
    assert canonical_json([huge]) == b"[" + canonical_json(huge) + b"]"


def test_non_finite_floats_do_not_raise() -> None:
    assert len({canonical_json(math.nan), canonical_json(math.inf), canonical_json(-math.inf)}) == 3


def test_string_escaping_does_not_matter() -> None:
    assert canonical_json(orjson.loads(b'"\\u00e9"')) == canonical_json(orjson.loads('"é"'.encode())) == '"é"'.encode()
    assert canonical_json(json.loads(b'"\\/\\u0041\\t"')) == canonical_json("/A\t") == b'"/A\\t"'


def test_keys_sort_by_code_point() -> None:
    assert canonical_json({"b": 1, "a": 2, "é": 3, "Z": 4, "\U0001f600": 5, "\uffff": 6}) == (
        '{"Z":4,"a":2,"b":1,"é":3,"\uffff":6,"\U0001f600":5}'.encode()
    )


def test_lone_surrogates_do_not_raise() -> None:
    value = json.loads(b'{"a": "\\ud800", "\\udfff": 1}')
    assert canonical_json(value) != canonical_json({"a": "", "": 1})


@pytest.mark.parametrize("kind", ["list", "object"])
def test_deep_nesting_does_not_raise(kind: str) -> None:
    value = nested(900, kind)
    encoded = canonical_json(value)
    assert encoded == canonical_json(orjson.loads(encoded))
    assert json_material({"deep": value}) == b'{"deep":' + encoded + b"}"


def test_not_json_raises_type_error() -> None:
    with pytest.raises(TypeError):
        canonical_json({"a": {1, 2}})


# --- json_material

BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream_options": {"include_usage": True},
    "metadata": {"x": [1, {"y": None}]},
}
OMIT = [("stream_options", "include_usage")]


def test_omitted_paths_do_not_change_the_material() -> None:
    without = {k: v for k, v in BODY.items() if k != "stream_options"}  # an emptied object goes too
    assert json_material(BODY, OMIT) == canonical_json(without)
    other = BODY | {"stream_options": {"include_usage": False}}
    assert json_material(other, OMIT) == json_material(BODY, OMIT)
    assert BODY["stream_options"] == {"include_usage": True}  # the body is not changed


def test_missing_paths_are_ignored() -> None:
    omit = [("nope",), ("model", "deeper"), ("metadata", "x", "y"), ("metadata", "z"), ()]
    assert json_material(BODY, omit) == canonical_json(BODY)


def test_omitting_a_top_level_member() -> None:
    assert json_material(BODY, [("metadata",)]) == canonical_json({k: v for k, v in BODY.items() if k != "metadata"})


def set_at(value: Any, path: list[Any], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: (set_at(v, rest, new) if k == head else v) for k, v in value.items()}
    return [set_at(v, rest, new) if i == head else v for i, v in enumerate(value)]


@pytest.mark.parametrize(
    ("path", "new"),
    [
        (["model"], "n"),
        (["messages", 0, "content"], "hi!"),
        (["messages", 0, "role"], "system"),
        (["metadata", "x", 0], 2),
        (["metadata", "x", 1, "y"], False),
        (["metadata", "x", 1, "y"], 0),
        (["stream_options", "include_usage"], 1),  # only the omitted path is ignored, not its siblings' types
    ],
)
def test_any_other_change_changes_the_material(path: list[Any], new: Any) -> None:
    changed = set_at(BODY, path, new)
    if path == ["stream_options", "include_usage"]:
        assert json_material(changed, OMIT) == json_material(BODY, OMIT)
        assert json_material(changed) != json_material(BODY)
    else:
        assert json_material(changed, OMIT) != json_material(BODY, OMIT)


def test_unknown_fields_change_the_material() -> None:
    assert json_material(BODY | {"vendor_extension": None}, OMIT) != json_material(BODY, OMIT)
    assert json_material(BODY | {"stream_options": {"include_usage": True, "x": 1}}, OMIT) != json_material(BODY, OMIT)


@FUZZ
@given(OBJECTS, st.data())
def test_changing_any_leaf_changes_the_material(body: dict[str, Any], data: st.DataObject) -> None:
    leaves: list[list[Any]] = []

    def walk(value: Any, path: list[Any]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, [*path, k])
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, [*path, i])
        else:
            leaves.append(path)

    walk(body, [])
    if not leaves:
        return
    path = data.draw(st.sampled_from(leaves))
    new = data.draw(SCALARS)
    old: Any = body
    for step in path:
        old = old[step]
    changed = set_at(body, path, new)
    assert (json_material(changed) == json_material(body)) == json_equal(new, old)


# --- multipart_material


def form(boundary: bytes, parts: list[tuple[bytes, bytes]]) -> bytes:
    """A multipart/form-data body of (headers, data) parts."""
    body = b""
    for headers, data in parts:
        body += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


AUDIO = bytes(range(256)) * 64 + b"\r\n--not-the-boundary\r\n"
PARTS = [
    (b'Content-Disposition: form-data; name="model"', b"whisper-1"),
    (b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav', AUDIO),
    (b'Content-Disposition: form-data; name="language"', b"fr"),
]


def material(parts: list[tuple[bytes, bytes]], boundary: bytes = b"XyZ123") -> bytes:
    return multipart_material(form(boundary, parts), boundary)


def test_the_boundary_does_not_matter() -> None:
    assert material(PARTS, b"XyZ123") == material(PARTS, b"----WebKitFormBoundary7MA4YWxkTrZu0gW")
    assert b"XyZ123" not in material(PARTS, b"XyZ123")


def test_header_spelling_and_content_type_parameters_do_not_matter() -> None:
    respelled_parts = [
        (b'content-disposition: form-data;name="model"', b"whisper-1"),
        (b'CONTENT-DISPOSITION: form-data; name=file; filename="a.wav"\r\ncontent-type: Audio/WAV; rate=16000', AUDIO),
        (b'Content-Disposition: form-data; name="language"', b"fr"),
    ]
    assert material(respelled_parts) == material(PARTS)


@pytest.mark.parametrize(
    "change",
    [
        lambda parts: [parts[0], (parts[1][0], AUDIO[:-1] + b"!"), parts[2]],  # one file byte
        lambda parts: [parts[0], (parts[1][0], AUDIO + b"\x00"), parts[2]],  # one more file byte
        lambda parts: [parts[0], parts[1], (parts[2][0], b"de")],  # a field value
        lambda parts: [parts[0], parts[1], (b'Content-Disposition: form-data; name="lang"', b"fr")],  # a name
        lambda parts: [parts[0], (parts[1][0].replace(b"a.wav", b"a.mp3"), AUDIO), parts[2]],  # a file name
        lambda parts: [parts[0], (parts[1][0].replace(b'; filename="a.wav"', b""), AUDIO), parts[2]],
        lambda parts: [parts[0], (parts[1][0].replace(b"a.wav", b""), AUDIO), parts[2]],  # empty file name
        lambda parts: [parts[0], (parts[1][0].replace(b"audio/wav", b"audio/mpeg"), AUDIO), parts[2]],
        lambda parts: [parts[0], (parts[1][0].replace(b"\r\nContent-Type: audio/wav", b""), AUDIO), parts[2]],
        lambda parts: [parts[2], parts[1], parts[0]],  # order
        lambda parts: parts[:2],  # a part fewer
        lambda parts: [*parts, parts[2]],  # a part more
    ],
)
def test_any_change_of_a_part_changes_the_material(change: Any) -> None:
    assert material(change(PARTS)) != material(PARTS)


def test_field_boundaries_cannot_be_shifted() -> None:
    a = [(b'Content-Disposition: form-data; name="ab"', b"c")]
    b = [(b'Content-Disposition: form-data; name="a"', b"bc")]
    assert material(a) != material(b)


def test_omitted_parts_are_left_out_and_only_those() -> None:
    rest = PARTS[1:]  # PARTS without its model
    alias = form(b"B", [(b'Content-Disposition: form-data; name="model"', b"stt-alias"), *rest])
    direct = form(b"B", PARTS)
    assert multipart_material(alias, b"B", omit=(b"model",)) == multipart_material(direct, b"B", omit=(b"model",))
    assert multipart_material(alias, b"B", omit=(b"model",)) == multipart_material(form(b"B", rest), b"B")
    assert multipart_material(alias, b"B") != multipart_material(direct, b"B")
    assert multipart_material(direct, b"B", omit=(b"language",)) != multipart_material(direct, b"B", omit=(b"model",))


def test_an_empty_form_has_material() -> None:
    assert multipart_material(b"--B--\r\n", b"B") == multipart_material(b"--C--\r\n", b"C")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"garbage",
        b"preamble\r\n" + form(b"B", PARTS),
        form(b"B", PARTS)[:-10],  # no closing boundary
        form(b"B", PARTS)[:200],  # cut inside a part
        form(b"B", [(b'Content-Disposition: form-data; name="a"\r\nContent-Disposition: form-data; name="b"', b"")]),
        form(b"B", [(b"Content-Type: text/plain\r\ncontent-type: text/html", b"")]),
        form(b"C", PARTS),  # another boundary
    ],
)
def test_malformed_bodies_raise_value_error(body: bytes) -> None:
    with pytest.raises(ValueError, match="multipart"):
        multipart_material(body, b"B")


# --- cache_key

FIELDS: dict[str, Any] = {
    "endpoint": "/v1/chat/completions",
    "model": "llama",
    "partition": "team-a",
    "namespace": "default",
    "material": b'{"a":1}',
    "variant": "json",
}


def test_cache_key_is_a_stable_sha256_hex() -> None:
    key = cache_key(**FIELDS)
    assert key == cache_key(**FIELDS)
    assert len(key) == 64
    assert int(key, 16) >= 0
    assert KEY_VERSION == 2  # 2: the body's model is no longer in the material


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_every_field_changes_the_key(field: str) -> None:
    changed = FIELDS | {field: FIELDS[field] + (b"x" if isinstance(FIELDS[field], bytes) else "x")}
    assert cache_key(**changed) != cache_key(**FIELDS)


def test_variant_defaults_to_empty() -> None:
    fields = {k: v for k, v in FIELDS.items() if k != "variant"}
    assert cache_key(**fields) == cache_key(**fields, variant="")
    assert cache_key(**fields, variant="stream") != cache_key(**fields, variant="json")


def test_no_collision_by_concatenation() -> None:
    base = FIELDS | {"endpoint": "ab", "model": "c"}
    assert cache_key(**base) != cache_key(**(base | {"endpoint": "a", "model": "bc"}))
    assert cache_key(**(FIELDS | {"namespace": "n", "variant": ""})) != cache_key(
        **(FIELDS | {"namespace": "", "variant": "n"})
    )
    assert cache_key(**(FIELDS | {"variant": "x", "material": b""})) != cache_key(
        **(FIELDS | {"variant": "", "material": b"x"})
    )


def test_unencodable_text_does_not_raise() -> None:
    assert cache_key(**(FIELDS | {"model": "\ud800"})) != cache_key(**FIELDS)


def test_partition_of_credential_hides_the_credential() -> None:
    credential = b"sk-secret-0123456789"
    partition = partition_of_credential(credential)
    assert partition == partition_of_credential(credential)
    assert len(partition) == 64
    assert credential.hex() not in partition
    assert partition != partition_of_credential(credential + b"x")
    keyed = partition_of_credential(credential, secret=b"k")
    assert keyed not in (partition, partition_of_credential(credential, secret=b"l"))


def test_short_is_the_first_12_characters() -> None:
    key = cache_key(**FIELDS)
    assert short(key) == key[:12]
    assert len(short(key)) == 12
