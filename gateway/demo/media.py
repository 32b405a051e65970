"""``POST /v1/embeddings`` (deterministic unit vectors, float or base64) and
``POST /v1/images/generations`` (one-colour PNGs, b64_json only)."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import zlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.demo.common import (
    bad_request,
    check_context,
    estimate_tokens,
    int_field,
    json_body,
    json_response,
    resolve_model,
    text_field,
    unix_time,
)
from gateway.demo.state import DemoState

DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_IMAGES = 10
IMAGE_SIDE = 8


def _is_embedding(model: dict[str, Any]) -> bool:
    return model.get("category") == "embedding"


def _is_image(model: dict[str, Any]) -> bool:
    return model.get("category") == "image"


def _embedding_inputs(value: object) -> list[tuple[bytes, int]]:
    """(hash key, token count) per input of an embeddings ``input``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array", "invalid_value")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]
    inputs: list[tuple[bytes, int]] = []
    for item in value:
        if isinstance(item, str) and item:
            inputs.append((item.encode(), estimate_tokens(item)))
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            inputs.append((orjson.dumps(item), len(item)))
        else:
            raise bad_request("each input must be a non-empty string or array of token ids", "invalid_value")
    return inputs


def _vector(key: bytes, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``key``, already rounded to float32."""
    raw = b""
    counter = 0
    while len(raw) < 4 * dimensions:
        raw += hashlib.sha256(key + counter.to_bytes(4, "little")).digest()
        counter += 1
    values = [int.from_bytes(raw[4 * i : 4 * i + 4], "little") / 2**31 - 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def embeddings(state: DemoState, request: Request) -> Response:
    body = await json_body(request)
    model = resolve_model(state, body.get("model"), "/v1/embeddings", _is_embedding)
    dims = int_field(body, "dimensions", DEFAULT_EMBEDDING_DIMENSIONS, 1, MAX_EMBEDDING_DIMENSIONS)
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "invalid_value")
    inputs = _embedding_inputs(body.get("input"))
    for _key, tokens in inputs:
        check_context(model, tokens, None)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(_vector(key, dims), encoding_format)}
        for i, (key, _tokens) in enumerate(inputs)
    ]
    tokens = sum(t for _key, t in inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return json_response({"object": "list", "data": data, "model": model["model_name"], "usage": usage})


# --------------------------------------------------------------------------- images


def _png(width: int, height: int, rgb: bytes) -> bytes:
    """A valid truecolour PNG filled with one colour."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = (b"\x00" + rgb * width) * height
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


async def images(state: DemoState, request: Request) -> Response:
    body = await json_body(request)
    resolve_model(state, body.get("model"), "/v1/images/generations", _is_image)
    prompt = text_field(body, "prompt")
    count = int_field(body, "n", 1, 1, MAX_IMAGES)
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise bad_request(
            "response_format must be 'b64_json': FlexAI returns images as b64_json only", "unsupported_value"
        )
    data = []
    for index in range(count):
        colour = hashlib.sha256(f"{index}:{prompt}".encode()).digest()[:3]
        data.append({"b64_json": base64.b64encode(_png(IMAGE_SIDE, IMAGE_SIDE, colour)).decode()})
    return json_response({"created": unix_time(), "data": data})


# --------------------------------------------------------------------------- speech
