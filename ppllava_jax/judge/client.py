"""A small client of an OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``),
standard library only (no ``openai`` package is needed; any server speaking that API works: the
OpenAI API, vLLM / SGLang / llama.cpp serving an open model, a proxy).

What is retried, with exponential backoff (``backoff * 2**attempt`` seconds, at most
``max_backoff``, a random part added; a ``Retry-After`` header is obeyed): a timeout, HTTP 408,
409, 429 and 5xx, a dropped connection, and a reply that is not the API's JSON (no
``choices[0].message.content``). After ``retries`` retries the question fails
(:class:`RequestFailed`: the run goes on and names it). HTTP 400 / 413 / 422 fail the question
at once (the request itself is refused, e.g. too long). What no retry can mend stops the run
(:class:`EndpointError`, a one-line ``error:``): a refused key (401, 403), an unknown path or
model (404), a host that does not answer (refused connection, unknown name).
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
FATAL_STATUS = {
    401: "the endpoint refused the API key",
    403: "the endpoint refused the API key",
    404: "no chat completions there (check --base_url, e.g. https://api.openai.com/v1 or "
    "http://localhost:8000/v1, and --model)",
}


class EndpointError(ValueError):
    """The endpoint cannot be used at all (bad URL, refused key, unknown model): stop."""


class RequestFailed(RuntimeError):
    """One request failed for good (retries spent, or refused); the run goes on."""


def check_base_url(base_url: str) -> str:
    """``base_url`` without a trailing ``/`` or ``/chat/completions``; ValueError unless it is
    an http(s) URL."""
    url = base_url.strip().rstrip("/")
    url = url.removesuffix("/chat/completions")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"--base_url {base_url!r} is not an http(s) URL (e.g. https://api.openai.com/v1, "
            "http://localhost:8000/v1)"
        )
    return url


def _snippet(body: bytes | str, n: int = 200) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def reply_content(body: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions reply; ValueError when the body
    is not that JSON."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat-completions JSON reply: {_snippet(body)!r}") from None
    if not isinstance(content, str):
        raise ValueError(f"the reply's message has no text content: {_snippet(body)!r}")
    return content


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _unreachable(err: BaseException) -> bool:
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror))


class ChatClient:
    """``complete(messages)`` -> the reply text of one chat completion.

    base_url: the API root (``.../v1``); model: sent as ``model``; api_key: sent as a bearer
    token unless empty; timeout: seconds per request; retries: further tries of a request that
    can be retried; temperature: sent only when given (the original sends none: the server's
    default)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout: float = 60.0,
        retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.base_url = check_base_url(base_url)
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = temperature
        self.sleep = sleep

    def _request(self, messages: Sequence[dict[str, str]]) -> urllib.request.Request:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages)}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8")
        return urllib.request.Request(self.url, data=data, headers=headers, method="POST")

    def _delay(self, attempt: int, hint: float | None) -> float:
        base = min(self.max_backoff, self.backoff * 2**attempt)
        if hint is not None:
            return min(self.max_backoff, hint)
        return base + random.uniform(0, base / 2)

    def complete(self, messages: Sequence[dict[str, str]]) -> str:
        """The reply text; RequestFailed when the request fails for good, EndpointError when
        the endpoint cannot be used."""
        last = ""
        for attempt in range(self.retries + 1):
            hint = None
            try:
                with urllib.request.urlopen(self._request(messages), timeout=self.timeout) as r:
                    body = r.read()
                return reply_content(body)
            except urllib.error.HTTPError as e:
                detail = _snippet(e.read() or b"")
                if e.code in FATAL_STATUS:
                    raise EndpointError(
                        f"POST {self.url}: HTTP {e.code}: {FATAL_STATUS[e.code]} ({detail})"
                    ) from None
                if e.code not in RETRY_STATUS:
                    raise RequestFailed(f"HTTP {e.code}: {detail}") from None
                last, hint = f"HTTP {e.code}: {detail}", _retry_after(e)
            except TimeoutError:
                last = f"no reply within {self.timeout:g} s"
            except urllib.error.URLError as e:
                if _unreachable(e):
                    raise EndpointError(f"cannot reach --base_url {self.url}: {e.reason}") from None
                if isinstance(e.reason, TimeoutError):
                    last = f"no reply within {self.timeout:g} s"
                else:
                    last = f"connection failed: {e.reason}"
            except (ConnectionError, http.client.HTTPException) as e:
                if _unreachable(e):
                    raise EndpointError(f"cannot reach --base_url {self.url}: {e}") from None
                last = f"connection failed: {type(e).__name__}: {e}"
            except ValueError as e:  # the body is not the API's JSON
                last = str(e)
            if attempt < self.retries:
                self.sleep(self._delay(attempt, hint))
        raise RequestFailed(f"{last} (after {self.retries + 1} tries)")
