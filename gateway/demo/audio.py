"""``POST /v1/audio/speech`` (a sine tone, as WAV or raw PCM) and ``POST /v1/audio/transcriptions`` (multipart
upload in, a transcript naming its size and sha256 out)."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import wave
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from gateway.demo.common import bad_request, json_body, json_response, resolve_model, supports, text_field
from gateway.demo.state import DemoState

SPEECH_SAMPLE_RATE = 8000
SPEECH_SECONDS_PER_CHAR = 0.06
SPEECH_MAX_SECONDS = 10.0
# The speech formats OpenAI's API defines (anything else is a 400). The simulated upstream encodes
# only two of them: "pcm" is raw 16-bit little-endian mono samples (no header), "wav" the same
# samples in a WAV (RIFF) file. It has no mp3, opus, aac or flac encoder, so for those (and for the
# default, mp3) it answers the WAV file, labelled audio/wav, and says so in x-demo-audio-format.
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
SPEECH_PCM_CONTENT_TYPE = "audio/pcm"
SPEECH_WAV_CONTENT_TYPE = "audio/wav"
TRANSCRIPTION_FORMATS = frozenset({"json", "text", "verbose_json", "srt", "vtt"})


def _is_stt(model: dict[str, Any]) -> bool:
    return model.get("category") == "audio" and supports(model, "audio_transcription")


def _is_tts(model: dict[str, Any]) -> bool:
    return model.get("category") == "audio" and not _is_stt(model)


def _pcm(seconds: float, frequency: float) -> bytes:
    """A sine of ``seconds`` as raw 16-bit little-endian mono samples at SPEECH_SAMPLE_RATE."""
    frames = max(1, int(seconds * SPEECH_SAMPLE_RATE))
    step = 2 * math.pi * frequency / SPEECH_SAMPLE_RATE
    return struct.pack(f"<{frames}h", *(int(8000 * math.sin(step * i)) for i in range(frames)))


def _wav(pcm: bytes) -> bytes:
    """``pcm`` (16-bit mono at SPEECH_SAMPLE_RATE) in a WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SPEECH_SAMPLE_RATE)
        out.writeframes(pcm)
    return buffer.getvalue()


def _voice_index(model: dict[str, Any], body: dict[str, Any]) -> int:
    voice = text_field(body, "voice")
    voices = model.get("voices")
    if not isinstance(voices, list) or not voices:
        return 0
    if voice not in voices:
        raise bad_request(
            f"Voice '{voice}' is not available for {model['model_name']}; choose one of: {', '.join(voices)}",
            "invalid_voice",
        )
    return voices.index(voice)


async def speech(state: DemoState, request: Request) -> Response:
    """Text to speech: a sine tone as long as the text. The Content-Type always names what the
    bytes are: ``pcm`` is raw samples (audio/pcm), every other format a WAV file (audio/wav), since
    the simulated upstream has no mp3/opus/aac/flac encoder; ``x-demo-audio-format`` says which of
    the two was sent."""
    body = await json_body(request)
    model = resolve_model(state, body.get("model"), "/v1/audio/speech", _is_tts)
    text = text_field(body, "input")
    voice = _voice_index(model, body)
    response_format = body.get("response_format") or "mp3"
    if response_format not in SPEECH_FORMATS:
        raise bad_request(f"'response_format' must be one of: {', '.join(SPEECH_FORMATS)}", "invalid_value")
    seconds = min(SPEECH_MAX_SECONDS, 0.25 + SPEECH_SECONDS_PER_CHAR * len(text))
    pcm = _pcm(seconds, 220.0 + 110.0 * voice)
    if response_format == "pcm":
        return Response(pcm, media_type=SPEECH_PCM_CONTENT_TYPE, headers={"x-demo-audio-format": "pcm"})
    return Response(_wav(pcm), media_type=SPEECH_WAV_CONTENT_TYPE, headers={"x-demo-audio-format": "wav"})


# --------------------------------------------------------------------------- transcriptions


def _audio_seconds(data: bytes) -> float:
    """The duration of WAV data, else an estimate for 16 kHz 16-bit mono."""
    try:
        with wave.open(io.BytesIO(data), "rb") as audio:
            return audio.getnframes() / audio.getframerate()
    except (wave.Error, EOFError):
        return len(data) / 32000


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def _transcription_response(text: str, seconds: float, response_format: str, headers: dict[str, str]) -> Response:
    usage = {"type": "duration", "seconds": math.ceil(seconds)}
    if response_format == "text":
        return Response(text, media_type="text/plain", headers=headers)
    if response_format in ("srt", "vtt"):
        sep = "," if response_format == "srt" else "."
        cue = f"{_timestamp(0, sep)} --> {_timestamp(seconds, sep)}\n{text}\n"
        body = f"1\n{cue}" if response_format == "srt" else f"WEBVTT\n\n{cue}"
        return Response(body, media_type="text/plain", headers=headers)
    if response_format == "verbose_json":
        segment = {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": seconds,
            "text": text,
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": -0.1,
            "compression_ratio": 1.0,
            "no_speech_prob": 0.0,
        }
        verbose = {
            "task": "transcribe",
            "language": "english",
            "duration": seconds,
            "text": text,
            "segments": [segment],
            "usage": usage,
        }
        return json_response(verbose, headers=headers)
    return json_response({"text": text, "usage": usage}, headers=headers)


async def transcriptions(state: DemoState, request: Request) -> Response:
    """Speech to text. The text names the byte count and sha256 of the uploaded file, and the
    ``x-demo-file-sha256`` header carries the sha256, so tests can check the upload byte for byte."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("expected a multipart/form-data body", "invalid_value")
    async with request.form(max_part_size=1024 * 1024) as form:
        resolve_model(state, form.get("model"), "/v1/audio/transcriptions", _is_stt)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request("'file' is required", "missing_required_parameter")
        data = await upload.read()
        response_format = form.get("response_format") or "json"
    if response_format not in TRANSCRIPTION_FORMATS:
        raise bad_request(
            f"'response_format' must be one of: {', '.join(sorted(TRANSCRIPTION_FORMATS))}", "invalid_value"
        )
    digest = hashlib.sha256(data).hexdigest()
    text = f"Simulated transcription of {len(data)} bytes (sha256 {digest})."
    headers = {"x-demo-file-sha256": digest}
    return _transcription_response(text, _audio_seconds(data), str(response_format), headers)
