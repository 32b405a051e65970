"""The simulated FlexAI catalog: the ``GET /api/models`` entries and ``default_catalog()``."""

from __future__ import annotations

from typing import Any


def _token_model(
    model_name: str,
    *,
    slug: str,
    display_name: str,
    description: str,
    category: str,
    provider: str,
    context_window: int,
    max_output: int,
    price: tuple[float, float],
    supports: list[str],
    health: str | None = "healthy",
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "slug": slug,
        "model_name": model_name,
        "display_name": display_name,
        "description": description,
        "category": category,
        "context_window": context_window,
        "max_output": max_output,
        "input_per_mtok": price[0],
        "output_per_mtok": price[1],
        "supports": supports,
        "pricing": [],
        "health_status": health,
        "provider": provider,
    }
    if health is None:
        del entry["health_status"]
    return entry


def _unit_model(
    model_name: str,
    *,
    slug: str,
    display_name: str,
    description: str,
    category: str,
    provider: str,
    supports: list[str],
    unit: str,
    price_usd: float,
) -> dict[str, Any]:
    return {
        "slug": slug,
        "model_name": model_name,
        "display_name": display_name,
        "description": description,
        "category": category,
        "context_window": 0,
        "max_output": 0,
        "input_per_mtok": 0.0,
        "output_per_mtok": 0.0,
        "supports": supports,
        "pricing": [{"unit": unit, "price_usd": price_usd}],
        "health_status": "healthy",
        "provider": provider,
    }


def _chat_catalog() -> list[dict[str, Any]]:
    return [
        _token_model(
            "Qwen2.5-32B-Instruct-FP8",
            slug="qwen-qwen2-5-32b-instruct",
            display_name="Qwen 2.5 32B Instruct",
            description="Qwen 2.5 32B — instruction-tuned text model, FP8.",
            category="text",
            provider="Qwen",
            context_window=32768,
            max_output=8192,
            price=(0.80, 0.80),
            supports=["chat", "tool_use", "streaming"],
        ),
        _token_model(
            "Llama-3.1-8B-Instruct",
            slug="meta-llama-llama-3-1-8b-instruct",
            display_name="Llama 3.1 8B Instruct",
            description="Meta Llama 3.1 8B — small, fast instruction-tuned text model.",
            category="text",
            provider="Meta",
            context_window=8192,
            max_output=2048,
            price=(0.10, 0.10),
            supports=["chat", "streaming"],
        ),
        _token_model(
            "DeepSeek-R1-Distill-Qwen-32B",
            slug="deepseek-ai-deepseek-r1-distill-qwen-32b",
            display_name="DeepSeek R1 Distill Qwen 32B",
            description="DeepSeek R1 distilled into Qwen 32B — step-by-step reasoning.",
            category="reasoning",
            provider="DeepSeek",
            context_window=32768,
            max_output=16384,
            price=(0.90, 0.90),
            supports=["chat", "streaming", "reasoning"],
            health="degraded",
        ),
        _token_model(
            "Qwen2.5-VL-7B-Instruct",
            slug="qwen-qwen2-5-vl-7b-instruct",
            display_name="Qwen 2.5 VL 7B Instruct",
            description="Qwen 2.5 VL 7B — text and image input, tool calling.",
            category="multimodal",
            provider="Qwen",
            context_window=32768,
            max_output=8192,
            price=(0.30, 0.30),
            supports=["chat", "vision", "streaming", "tool_use"],
        ),
        _token_model(
            "Llama-3.2-11B-Vision-Instruct",
            slug="meta-llama-llama-3-2-11b-vision-instruct",
            display_name="Llama 3.2 11B Vision Instruct",
            description="Meta Llama 3.2 11B Vision — image understanding, no streaming.",
            category="vision",
            provider="Meta",
            context_window=131072,
            max_output=4096,
            price=(0.35, 0.35),
            supports=["chat", "vision"],
        ),
        _token_model(
            "Qwen2.5-Coder-32B-Instruct",
            slug="qwen-qwen2-5-coder-32b-instruct",
            display_name="Qwen 2.5 Coder 32B Instruct",
            description="Qwen 2.5 Coder 32B — code generation and repair.",
            category="code",
            provider="Qwen",
            context_window=32768,
            max_output=8192,
            price=(0.80, 0.80),
            supports=["chat", "streaming"],
            health="unhealthy",
        ),
        _token_model(
            "Mistral-7B-Instruct-v0.3",
            slug="mistralai-mistral-7b-instruct-v0-3",
            display_name="Mistral 7B Instruct v0.3",
            description="Mistral 7B Instruct v0.3 — compact general-purpose text model.",
            category="text",
            provider="Mistral AI",
            context_window=32768,
            max_output=4096,
            price=(0.15, 0.15),
            supports=["chat", "streaming"],
            health="maintenance",
        ),
        _token_model(
            "Phi-3.5-mini-instruct",
            slug="microsoft-phi-3-5-mini-instruct",
            display_name="Phi 3.5 Mini Instruct",
            description="Microsoft Phi 3.5 mini — 3.8B text model with a long context.",
            category="text",
            provider="Microsoft",
            context_window=131072,
            max_output=4096,
            price=(0.10, 0.10),
            supports=["chat", "streaming"],
            health=None,
        ),
    ]


def _media_catalog() -> list[dict[str, Any]]:
    tts = _unit_model(
        "Kokoro-82M",
        slug="hexgrad-kokoro-82m",
        display_name="Kokoro 82M",
        description="Kokoro 82M — lightweight multi-voice text-to-speech.",
        category="audio",
        provider="hexgrad",
        supports=["tts"],
        unit="character",
        price_usd=0.000015,
    )
    tts["voices"] = ["af_bella", "am_adam", "bf_emma"]
    embedding = _token_model(
        "bge-m3",
        slug="baai-bge-m3",
        display_name="BGE M3",
        description="BAAI BGE M3 — multilingual dense embeddings.",
        category="embedding",
        provider="BAAI",
        context_window=8192,
        max_output=0,
        price=(0.02, 0.0),
        supports=["embeddings"],
    )
    return [
        embedding,
        _unit_model(
            "FLUX.1-schnell",
            slug="black-forest-labs-flux-1-schnell",
            display_name="FLUX.1 [schnell]",
            description="FLUX.1 schnell — fast text-to-image generation.",
            category="image",
            provider="Black Forest Labs",
            supports=["image_generation"],
            unit="image",
            price_usd=0.003,
        ),
        tts,
        _unit_model(
            "whisper-large-v3",
            slug="openai-whisper-large-v3",
            display_name="Whisper Large v3",
            description="Whisper large-v3 — multilingual speech-to-text.",
            category="audio",
            provider="OpenAI",
            supports=["audio_transcription"],
            unit="minute",
            price_usd=0.006,
        ),
        _unit_model(
            "Wan2.1-T2V-1.3B",
            slug="wan-ai-wan2-1-t2v-1-3b",
            display_name="Wan 2.1 T2V 1.3B",
            description="Wan 2.1 text-to-video, 1.3B parameters — short 480p clips.",
            category="video",
            provider="Wan-AI",
            supports=["video_generation"],
            unit="second",
            price_usd=0.05,
        ),
    ]


def default_catalog() -> list[dict[str, Any]]:
    """A fresh copy of the simulated ``GET /api/models`` array, one model per case worth testing.

    Token models (chat and embedding) carry ``input_per_mtok``/``output_per_mtok`` and
    ``pricing: []``. Non-token models carry zero per-token prices and ``pricing`` entries of
    the shape ``{"unit": "image" | "second" | "character" | "minute", "price_usd": float}``
    (per image, per second of video output, per TTS character, per minute of STT audio):
    that shape is our assumption, FlexAI does not document it. ``context_window`` and
    ``max_output`` are 0 for non-token models. The TTS model lists its ``voices``.
    """
    return _chat_catalog() + _media_catalog()
