"""A judge on any OpenAI-compatible ``/chat/completions`` endpoint over plain HTTP (``urllib``)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from saeot.evaluation.judge._base import Judge

__all__ = ["OpenAICompatibleJudge", "JudgeUnreachable"]


class JudgeUnreachable(ConnectionError):
    """The judge endpoint refuses connections or does not answer within its timeout."""


def _env_or(value: str | None, env: str | None) -> str | None:
    if value:
        return value
    return os.environ.get(env) if env else None


class OpenAICompatibleJudge(Judge):
    """Any OpenAI-compatible chat endpoint over plain HTTP (``POST {base_url}/chat/completions``).

    Args:
        base_url / model / api_key: explicit values; else read from the environment
            variables named by ``base_url_env`` / ``model_env`` / ``api_key_env``. The key
            may be empty (local servers); it is never logged nor cached.
        temperature, max_tokens: decoding (0 and a few tokens: the answer is one word).
        timeout_s, max_retries: per request; retries back off on 429 / 5xx / refused connections; a
            request that gets no answer within ``timeout_s`` ends the run at once (JudgeUnreachable).
    """

    name = "openai_compatible"

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 base_url_env: str | None = "OPENAI_BASE_URL", model_env: str | None = "SAEOT_JUDGE_MODEL",
                 api_key_env: str | None = "OPENAI_API_KEY", temperature: float = 0.0, max_tokens: int = 16,
                 timeout_s: float = 60.0, max_retries: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = _env_or(base_url, base_url_env)
        self.model = _env_or(model, model_env)
        if not self.base_url:
            raise ValueError(f"judge=openai_compatible needs a base URL: set ${base_url_env} or judge.base_url")
        if not self.model:
            raise ValueError(f"judge=openai_compatible needs a model name: set ${model_env} or judge.model")
        self.base_url = self.base_url.rstrip("/")
        self._api_key = _env_or(api_key, api_key_env) or ""
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)

    def identity(self) -> dict:
        return {"backend": self.name, "base_url": self.base_url, "model": self.model,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def complete(self, messages: list[dict[str, str]]) -> tuple[str, None]:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.base_url}/chat/completions"
        delay = 1.0
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    data = json.loads(resp.read().decode())
                choice = (data.get("choices") or [{}])[0]
                content = (choice.get("message") or {}).get("content")
                if content is None:
                    content = choice.get("text", "")
                return str(content), None
            except urllib.error.HTTPError as e:
                retry = e.code == 429 or e.code >= 500
                if not retry or attempt == self.max_retries:
                    detail = e.read().decode(errors="replace")[:200] if hasattr(e, "read") else ""
                    raise RuntimeError(f"judge endpoint {url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                    raise JudgeUnreachable(  # an endpoint that accepts and never answers: no retry, no hang
                        f"judge.base_url={self.base_url!r} did not answer within judge.timeout_s={self.timeout_s:g} s "
                        f"({url}); check that the server is up, or raise judge.timeout_s") from None
                if attempt == self.max_retries:
                    raise JudgeUnreachable(f"judge.base_url={self.base_url!r} cannot be reached ({e}) after "
                                           f"{attempt + 1} attempt(s); check the URL and that the server is up") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

