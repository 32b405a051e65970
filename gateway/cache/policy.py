"""What the cache may answer or store: the operator's rules and the built-in one, as pure decisions.

The built-in rule (``mode = "auto"``): embeddings always (the same input gives the same vectors);
chat and completions when the answer is deterministic (``temperature`` 0, or a ``seed``) or when the
client opts in with ``Cache-Control: max-age=N``; images, speech and transcriptions on that opt-in
only; video jobs never (an answer is a job, not a result). ``[[cache.rules]]`` set another mode or
ttl for an endpoint and/or a model, first match wins; ``always`` never extends to video jobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final

from gateway import endpoints
from gateway.cache.control import RequestDirectives
from gateway.config import CacheRule, CacheSettings
from gateway.jsonvalues import as_int, as_number

ALWAYS: Final = frozenset({endpoints.EMBEDDINGS})
WHEN_DETERMINISTIC: Final = frozenset({endpoints.CHAT, endpoints.COMPLETIONS})
ON_OPT_IN: Final = frozenset({endpoints.IMAGES, endpoints.SPEECH, endpoints.TRANSCRIPTIONS})
CACHEABLE: Final = ALWAYS | WHEN_DETERMINISTIC | ON_OPT_IN


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a request's answer may come from (and go to) the cache, for how long, or why not."""

    cacheable: bool
    ttl: float = 0.0
    detail: str = ""  # why not: the Cache-Status ``detail`` of a bypass


class Policy:
    def __init__(self, settings: CacheSettings) -> None:
        self._default_ttl = min(settings.ttl, settings.max_ttl)
        self._max_ttl = settings.max_ttl
        self._rules = settings.rules

    def decide(self, path: str, model: str, fields: Mapping[str, Any], directives: RequestDirectives) -> Verdict:
        if path not in CACHEABLE:
            return Verdict(False, detail="endpoint")
        rule = self._rule(path, model)
        mode = rule.mode if rule is not None else "auto"
        if mode == "never":
            return Verdict(False, detail="policy")
        ttl = self._default_ttl if rule is None or rule.ttl is None else min(rule.ttl, self._max_ttl)
        if mode == "always" or path in ALWAYS:
            return Verdict(True, ttl)
        opted_in = directives.max_age is not None
        if opted_in or (path in WHEN_DETERMINISTIC and deterministic(fields)):
            return Verdict(True, ttl)
        return Verdict(False, detail="not-deterministic" if path in WHEN_DETERMINISTIC else "opt-in")

    def _rule(self, path: str, model: str) -> CacheRule | None:
        for rule in self._rules:
            if (not rule.endpoint or rule.endpoint == path) and (not rule.model or fnmatchcase(model, rule.model)):
                return rule
        return None


def deterministic(fields: Mapping[str, Any]) -> bool:
    """A sampled answer that repeats: ``temperature`` 0, or a ``seed`` (an integer)."""
    return as_number(fields.get("temperature")) == 0.0 or as_int(fields.get("seed")) is not None
