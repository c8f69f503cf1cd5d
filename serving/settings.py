"""Server settings: one pydantic settings class, read from arguments or ``EDGEKD_SERVE_*`` variables.

Precedence, highest first: command-line flags, ``EDGEKD_SERVE_*`` environment variables, the recipe's
``serve`` section, the defaults below. ``edgekd.load`` (the Python API) gives its arguments in the flags' place
and reads no variable (``GivenSettings``); ``edgekd.api.serve_setup`` decides both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from edgekd.errors import ArgumentError, EdgeKDError
from edgekd.sections import changed_keys, it_or_them

ENV_PREFIX = "EDGEKD_SERVE_"


class SettingsError(EdgeKDError):
    """A server setting is invalid; the message names where it came from (flag, variable, recipe key)."""


class ServeSettings(BaseSettings):
    """How the inference server loads its artifact and guards its routes.

    Every field can also be set from the environment, e.g. ``EDGEKD_SERVE_BATCHING=true`` or
    ``EDGEKD_SERVE_API_KEY=...`` (the key is never logged nor echoed back).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_assignment=True)

    # --- what to serve --------------------------------------------------------------------------
    export_dir: Path | None = Field(
        None, description="Export folder holding the artifact, artifact.json (and a text model's tokenizer files)."
    )
    model_name: str | None = Field(
        None, description="Name on the v2 routes and in responses. Default: the run folder's name."
    )
    threads: int | None = Field(
        None, ge=1, description="Intra-op threads of the runtime (ONNX Runtime, ExecuTorch; default: its own). "
        "Refused for Core ML, TensorRT and TorchScript lite, whose runtimes choose their own."
    )
    runtime_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra options for the runner loader (e.g. providers for ONNX Runtime)."
    )

    # --- network ---------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(
        False, description="Log one line per request (uvicorn's access log, at info level). Off by default: "
        "it costs about as much per request as a small model's call; /metrics counts requests by route and status."
    )
    graceful_timeout_s: float = Field(
        30, gt=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    header_timeout_s: float = Field(
        10, gt=0, description="A connection whose request headers have not all arrived this long after it opened "
        "(or after its first byte, between requests) is closed: slow or silent clients do not hold connections."
    )
    body_timeout_s: float = Field(
        30, gt=0, description="A request whose body has not all arrived this long after its headers gets 408."
    )
    keep_alive_timeout_s: float = Field(
        5, gt=0, description="An idle keep-alive connection (no new request) is closed after this long."
    )
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="Also serve the Open Inference Protocol v2 over gRPC on this port (KServe's "
        "grpc_predict_v2, for tritonclient.grpc and KServe clients; needs edgekd[grpc]). Unset: HTTP only."
    )

    # --- batching --------------------------------------------------------------------------------
    batching: bool = Field(
        False, description="Group concurrent requests into one runner call (off: lowest batch-1 latency)."
    )
    max_batch_size: int = Field(32, ge=1, description="Most texts or images in one runner call when batching.")
    max_wait_ms: float = Field(
        2.0, ge=0, description="Longest an input waits, in milliseconds, for requests that have already arrived "
        "to join its batch (a lone request runs at once)."
    )
    max_queue: int = Field(
        4096, ge=1, description="Inputs (texts or images) waiting for the runner beyond which requests get 503 (overloaded)."
    )
    inference_workers: int = Field(
        1, ge=1, description="Runner calls that may run at once (threads); each call uses `threads` cores."
    )

    # --- request limits --------------------------------------------------------------------------
    max_items: int = Field(64, ge=1, description="Most texts in one request.")
    max_text_chars: int = Field(20_000, ge=1, description="Longest text accepted, in characters.")
    max_images: int = Field(16, ge=1, description="Most images in one request (detection models).")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest image accepted, in pixels (width x height), checked from the "
        "image header before decoding, so a small file cannot expand into gigabytes (decompression bomb)."
    )
    max_length: int | None = Field(
        None, ge=2, description="Tokens kept per text (default and upper bound: the artifact's max_length)."
    )
    overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="A text longer than max_length tokens: truncate it (and say so) or reject it."
    )
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body accepted, in bytes.")
    request_timeout_s: float = Field(
        30, gt=0, description="A request still waiting for the runner after this long gets 504."
    )
    api_key: SecretStr | None = Field(
        None, description="When set, inference and metadata routes need `Authorization: Bearer KEY` or `X-API-Key: KEY`."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.api_key is not None and not self.api_key.get_secret_value():
            raise ValueError("api_key is empty: leave it unset to disable authentication, or give a key")
        unread = [] if self.batching else changed_keys(self, keys=("max_batch_size", "max_wait_ms"))
        if unread:
            raise ValueError(f"{', '.join(unread)}: shape{'s' if len(unread) == 1 else ''} the micro-batches of "
                             f"concurrent requests, and batching is off: turn batching on, or unset "
                             f"{it_or_them(unread)}")
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> ServeSettings:
        """Settings from ``EDGEKD_SERVE_*`` variables, under ``overrides`` (e.g. command-line flags)."""
        return cls.from_config(None, **overrides)

    @classmethod
    def from_config(cls, config: Any, *, environment: bool = True, given: Literal["flag", "argument"] = "flag",
                    **overrides: Any) -> ServeSettings:
        """Settings from a recipe's ``serve`` section (``edgekd.recipe.ServeConfig``, or None), under the
        ``EDGEKD_SERVE_*`` environment (``environment``; without it, no variable is read), under ``overrides``
        (command-line flags, or the Python API's arguments: ``given``; None means not given). An invalid value is
        a ``SettingsError`` naming the flag, argument, variable or recipe key it came from; an invalid argument
        alone, an ``ArgumentError`` naming it."""
        data = config.model_dump(exclude={"target"}, exclude_none=True) if config is not None else {}
        env = EnvSettingsSource(cls)() if environment else {}
        for key in env:  # a variable overrides the recipe: leave the field for pydantic-settings to read
            data.pop(key, None)
        flags = {k: v for k, v in overrides.items() if v is not None}
        build = cls if environment else GivenSettings
        if given == "argument":
            try:
                build(**flags)
            except ValidationError as e:
                raise ArgumentError([_where(err, flags, {}, {}, given) for err in e.errors()]) from None
        data.update(flags)
        try:
            return build(**data)
        except ValidationError as e:
            raise SettingsError(_describe(e, flags, env, data, given)) from None


class GivenSettings(ServeSettings):
    """``ServeSettings`` from the values given alone: no ``EDGEKD_SERVE_*`` variable is read (the Python API's
    ``edgekd.load``: a server's environment does not change what a script's predictions are)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings,)


def refuse_unread(settings: ServeSettings, keys: tuple[str, ...], why: str) -> None:
    """A ``SettingsError`` naming the settings among ``keys`` set away from their defaults (by a flag, an
    ``EDGEKD_SERVE_*`` variable or the recipe's ``serve`` section) that the export being served never reads."""
    unread = changed_keys(settings, keys=keys)
    if unread:
        raise SettingsError(f"{', '.join(unread)}: {why}: unset {it_or_them(unread)} (the flag or edgekd.load "
                            f"argument, the {ENV_PREFIX}<KEY> variable or the serve.<key> recipe key)")


def _describe(error: ValidationError, flags: dict[str, Any], env: dict[str, Any], recipe: dict[str, Any],
              given: str = "flag") -> str:
    """One line per problem, naming where the bad value came from."""
    return "invalid server setting: " + "; ".join(_where(err, flags, env, recipe, given) for err in error.errors())


def _where(err: Any, flags: dict[str, Any], env: dict[str, Any], recipe: dict[str, Any], given: str) -> str:
    """One problem, naming where the bad value came from: a flag (``--port=70000``) or an argument (``threads:
    ... (got 0)``, ``given``), a variable, a recipe key."""
    field = str(err["loc"][0]) if err["loc"] else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not field:  # a whole-model check: its message names the field
        field = next((f for f in ServeSettings.model_fields if msg.startswith(f)), "")
    if field in flags and given == "argument":
        return f"{field}: {msg} (got {flags[field]!r})"
    if field in flags:
        where = f"--{field.replace('_', '-')}={flags[field]!r}"
    elif field in env:
        where = f"{ENV_PREFIX}{field.upper()}" + ("" if field == "api_key" else f"={env[field]!r}")
    elif field in recipe:
        where = f"serve.{field}={recipe[field]!r} (recipe)"
    else:
        where = field or "server settings"
    return f"{where}: {msg}"
