"""HTTP to a black-box teacher: bounded retries with exponential backoff, and a rate limit.

Connection errors, timeouts, 429 and 5xx answers are retried (waiting ``backoff_s``, then twice
as long each time, or the server's Retry-After, never over ``max_backoff_s``); any other error
answer (a wrong key, an unknown model, a rejected text) fails at once with the server's message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgekd.errors import RecipeError, StageError
from edgekd.recipe import TeacherClientConfig, TeacherEndpoint


class TeacherRequestError(StageError):
    """A black-box teacher could not be asked (unreachable after every retry, or it refused)."""


def api_key_headers(endpoint: TeacherEndpoint, where: str) -> dict[str, str]:
    """The auth header, the key read from the environment variable the recipe names."""
    if not endpoint.api_key_env:
        return {}
    key = os.environ.get(endpoint.api_key_env, "")
    if not key.strip():
        raise RecipeError([f"{where}.api_key_env: the environment variable {endpoint.api_key_env} is not set "
                           "(or empty): export it with the teacher's API key before running"])
    if endpoint.api_key_header.lower() == "authorization":
        return {"Authorization": f"Bearer {key.strip()}"}
    return {endpoint.api_key_header: key.strip()}


class RateLimiter:
    """At most ``per_second`` request starts per second (evenly spaced)."""

    def __init__(self, per_second: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / per_second if per_second else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        now = self.clock()
        if now < self._next:
            self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


@dataclass
class RequestStats:
    requests: int = 0  # every attempt sent, retries included
    retries: int = 0
    failures: list[str] = field(default_factory=list)  # why each retry was needed (the last few)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "retries": self.retries, "seconds": round(self.seconds, 2),
                "retry_reasons": self.failures[-5:]}


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _error_text(response: Any) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except ValueError:
        pass
    return response.text[:300]


def _hint(status: int, where: str) -> str:
    if status in (401, 403):
        return f"Check the API key in the variable named by {where}.api_key_env (and {where}.api_key_header)."
    if status == 404:
        return f"Check {where}.url and {where}.model_name."
    if status in (413, 422):
        return "Lower teacher.client.batch_size if the server takes fewer texts per request."
    return f"Check {where}.url, {where}.kind and the server's log."


class TeacherClient:
    """One httpx client per teacher, with the retry policy and the rate limit of the recipe."""

    def __init__(self, base_url: str, cfg: TeacherClientConfig, headers: dict[str, str], where: str,
                 sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.httpx = httpx
        self.cfg, self.where, self.sleep = cfg, where, sleep
        self.limiter = RateLimiter(cfg.requests_per_second, sleep=sleep)
        self.stats = RequestStats()
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=cfg.timeout_s)

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """Send one request (retried as the policy says) and return its JSON body."""
        httpx = self.httpx
        delay = self.cfg.backoff_s
        for attempt in range(1, self.cfg.max_attempts + 1):
            self.limiter.wait()
            self.stats.requests += 1
            t0 = time.perf_counter()
            response, reason = None, ""
            try:
                response = self.client.request(method, path, json=json)
            except httpx.TransportError as e:  # refused, reset, closed without an answer, timed out
                reason = f"{type(e).__name__}: {e}"
            finally:
                self.stats.seconds += time.perf_counter() - t0
            if response is not None:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise TeacherRequestError(f"{self.where}: {method} {path} answered {response.status_code} "
                                                  f"with a body that is not JSON: {response.text[:200]!r}") from None
                if response.status_code != 429 and response.status_code < 500:
                    raise TeacherRequestError(
                        f"{self.where}: {method} {self.client.base_url}{path} answered {response.status_code}: "
                        f"{_error_text(response).rstrip('.')}. {_hint(response.status_code, self.where)}")
                reason = f"HTTP {response.status_code}: {_error_text(response)[:120]}"
            self.stats.failures.append(reason)
            if attempt == self.cfg.max_attempts:
                raise TeacherRequestError(
                    f"{self.where}: {method} {self.client.base_url}{path} failed {attempt} times (last: {reason}). "
                    "Check that the teacher is up, or raise teacher.client.max_attempts / backoff_s; answers "
                    "received so far are cached, so a new run asks only for the rest.")
            self.stats.retries += 1
            wait = _retry_after(response)
            self.sleep(min(self.cfg.max_backoff_s, wait if wait is not None else delay))
            delay *= 2
        raise AssertionError("unreachable")  # the loop returns or raises
