"""The built-in simulated FlexAI upstream: a Starlette app that answers like tokens.flex.ai.

``create_demo_upstream()`` builds the app; everything it knows and counts lives in one
``DemoState`` that tests read and change while the server runs (catalog, token pacing, video
job duration, counters, the last requests received). Replies are deterministic functions of
the request; no network, no model, stdlib-only media (PNG via zlib, WAV via ``wave``).

What it serves (FlexAI's surface, see docs and shared notes):

- ``GET /api/models`` (the catalog), ``GET /api/status``, ``GET /v1/models`` (live models only),
  ``GET /v1/models/{model}``.
- ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed (SSE, paced by
  ``token_delay``) or not; tool calls; ``reasoning_content`` for reasoning models.
- ``POST /v1/embeddings`` (float or base64), ``POST /v1/images/generations`` (b64_json only),
  ``POST /v1/audio/speech`` (WAV or raw PCM), ``POST /v1/audio/transcriptions`` (multipart),
  ``POST /v1/videos/generations`` + ``GET /v1/videos/generations/{id}`` (asynchronous jobs).

Errors use FlexAI's envelope ``{"error": {"message", "type", "code"}}``: 400 for an unknown
model (``model_not_found``), a model of the wrong category, ``n > 1``, context overflow and
malformed requests; 404 for unknown routes and video jobs (``job_not_found``); 503 for a model
whose ``health_status`` is ``"maintenance"``. Any Authorization header is accepted.

Modules, imports pointing one way (``app`` -> endpoint modules -> ``reply``/``sse`` ->
``common`` -> ``state`` -> ``catalog``): ``catalog`` (the simulated models), ``state``
(``DemoState``), ``common`` (error envelope, JSON and field helpers, model resolution),
``reply`` and ``sse`` (text replies and their streaming), ``chat``, ``media``, ``audio``,
``video`` and ``models`` (the endpoints), ``app`` (``create_demo_upstream``), ``faults`` (switches
that fail one model, or ``/api/status``, for tests of routing).

Assumptions where FlexAI publishes nothing: the ``pricing[]`` entries of non-token models
(see ``default_catalog``), the ``/api/status`` details, the completed video job shape
(``data[0].b64_json`` holding a stub MP4 header, plus ``seconds`` and ``progress``), and the
audio payloads. Speech is a sine tone, labelled by what the bytes are: ``response_format: "pcm"``
gives raw 16-bit little-endian mono samples at 8 kHz (``audio/pcm``); every other format
(``wav``, and ``mp3``, ``opus``, ``aac``, ``flac``, which it cannot encode; ``mp3`` is the
default) gives a WAV file (``audio/wav``). ``x-demo-audio-format`` names which one was sent.
"""

from gateway.demo.app import create_demo_upstream
from gateway.demo.catalog import default_catalog
from gateway.demo.state import DemoState, RecordedRequest, VideoJob

__all__ = ["DemoState", "RecordedRequest", "VideoJob", "create_demo_upstream", "default_catalog"]
