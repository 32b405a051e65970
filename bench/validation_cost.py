"""What request validation costs per request: parse the body once, find the model, run every check.

    .venv/bin/python bench/validation_cost.py [--repeat 7] [--number 2000]

Two bodies: a typical chat request (a system and a user message) and a large one (a 100-message
conversation with 8 tool definitions). The figure is CPU time per request in microseconds, the
median of ``--repeat`` runs of ``--number`` requests, measured in this process (no network).
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from typing import Any

import orjson

from gateway import endpoints
from gateway.catalog.entries import parse_entry
from gateway.catalog.validation import validate
from gateway.demo import default_catalog
from gateway.proxy.body import model_of, parse_json_object

MODEL = "Qwen2.5-32B-Instruct-FP8"


def typical_body() -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write a haiku about proxies and the sea."},
            ],
            "temperature": 0.7,
            "max_tokens": 256,
        }
    )


def large_body() -> bytes:
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "Looks something up in a system of record and returns it as JSON. " * 3,
                "parameters": {
                    "type": "object",
                    "properties": {f"arg_{j}": {"type": "string", "description": "an argument"} for j in range(6)},
                    "required": ["arg_0"],
                },
            },
        }
        for i in range(8)
    ]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are an agent with tools. " * 10}]
    for i in range(99):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"Message {i}: " + "some words of conversation " * 12})
    return orjson.dumps({"model": MODEL, "messages": messages, "tools": tools, "tool_choice": "auto", "stream": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    raw = next(m for m in default_catalog() if m["model_name"] == MODEL)
    entry, _ = parse_entry(raw)
    assert entry is not None

    def admit(body: bytes) -> None:
        fields = parse_json_object(body)
        model_of(fields)
        for _ in validate(endpoints.CHAT, fields, (), entry):
            raise AssertionError("the benchmark bodies are valid")

    print("| body | size | parse + validate, us/request (median) | of which parsing |")
    print("|---|---:|---:|---:|")
    for name, body in (("typical chat", typical_body()), ("100 messages + 8 tools", large_body())):
        admit(body)
        total = statistics.median(timeit.repeat(lambda b=body: admit(b), number=args.number, repeat=args.repeat))
        parse = statistics.median(
            timeit.repeat(lambda b=body: parse_json_object(b), number=args.number, repeat=args.repeat)
        )
        per = 1e6 / args.number
        print(f"| {name} | {len(body) / 1024:.1f} KiB | {total * per:.1f} | {parse * per:.1f} |")


if __name__ == "__main__":
    main()
