"""Service settings, read from ``MMFUSION_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MMFUSION_"


def container_cpus() -> int:
    """CPUs this process may really use: cgroup v2/v1 quota and affinity, not the host's count.

    ONNX Runtime defaults to one thread per host core; in a container limited to 2 CPUs on a
    64-core host that oversubscribes 32x and wrecks tail latency.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        try:
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if q > 0 and p > 0:
                cpus = min(cpus, max(1, q // p))
        except (OSError, ValueError):
            pass
    return max(1, cpus)


class Settings(BaseSettings):
    """Every setting has a default that works for `make serve`; override with MMFUSION_<NAME>."""

    # allow_inf_nan=False: "inf" parses as a float, and an infinite queue delay crashed the batcher thread
    # (threading's wait cannot take it) while the health checks kept answering 200.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=None, extra="ignore", allow_inf_nan=False)

    bundle: Path = Field(default=Path("models/default"), description="Model bundle directory.")
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    root_path: str = Field(default="", description="Path prefix a reverse proxy serves the app under (uvicorn's "
                           "--root-path), e.g. /mmfusion: the docs and OpenAPI links then carry it.")
    forwarded_allow_ips: str | None = Field(
        default=None, description="Proxies trusted for X-Forwarded-For/-Proto (uvicorn's --forwarded-allow-ips; "
        "comma-separated, * for any): the access log then shows the client's address, not the proxy's. Unset: "
        "uvicorn's own default ($FORWARDED_ALLOW_IPS, else 127.0.0.1,::1).")
    keep_alive_s: int = Field(
        default=5, ge=1, le=3600, description="Idle keep-alive timeout of client connections (uvicorn's "
        "--timeout-keep-alive). Behind a load balancer set it above the balancer's idle timeout (AWS ALB: 60 s, "
        "so 65), or the balancer reuses connections the server just closed and answers 502.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value  # INFO, as logging spells it
    providers: str = Field(
        default="auto",
        description="ONNX Runtime execution providers, comma separated, or 'auto' (CUDA if available, else CPU).",
    )
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    trt_cache_dir: Path = Field(
        default=Path("data/trt-cache"),
        description="TensorRT engine and timing caches (only with MMFUSION_PROVIDERS=TensorrtExecutionProvider,...): "
        "a restart loads the built engines instead of rebuilding them. Must be writable.",
    )
    intra_op_threads: int = Field(
        default=0, ge=0,
        description="ONNX Runtime intra-op thread budget, 0 = the CPUs the container may use. The server splits "
        "it per graph (each has its own inference thread): image encoder all of it, text encoder half, fusion head 1.",
    )
    intra_op_spinning: bool = Field(
        default=False,
        description="Let ONNX Runtime's intra-op threads spin between parallel sections instead of sleeping. Faster "
        "for one graph running alone (image encoder at batch 1: 7.3 vs 10.2 ms on 2 cores), slower when the graphs and "
        "the decode pool run at the same time, as they do in the server under load; off by default.",
    )
    index_path: Path = Field(default=Path("data/index"), description="Directory of the persistent vector index.")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_text_chars: int = Field(default=10_000, ge=1)
    max_client_batch: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=100, ge=1)
    decode_threads: int = Field(default=0, ge=0, description="Image decode pool size; 0 = CPUs the container may use.")
    api_keys: str = Field(
        default="", description="Comma-separated API keys for the read routes; empty (and no file) = reads are open."
    )
    api_keys_file: Path | None = Field(
        default=None, description="File of API keys, one per line, '#' starts a comment; added to api_keys."
    )
    admin_keys: str = Field(
        default="",
        description="Comma-separated keys allowed to write the index (they also work on the read routes).",
    )
    admin_keys_file: Path | None = Field(default=None, description="File of admin keys, same format as api_keys_file.")
    cors_origins: str = ""
    warmup: bool = True
    gc_freeze: bool = Field(
        default=True,
        description="After start-up, move every object alive into the garbage collector's permanent generation "
        "(gc.freeze): full collections under load then take ~4 ms instead of 77-101 ms of stalled requests.",
    )
    max_batch_size: int = Field(
        default=32, ge=1,
        description="Dynamic batching: most rows one graph call carries (a larger client batch runs alone).",
    )
    max_queue_delay_ms: float = Field(
        default=0.0, ge=0.0, le=10_000.0,
        description="Dynamic batching: longest the oldest queued request waits for a batch to fill; "
        "0 = run what is queued now (no added latency when idle; batches still form under load).",
    )
    max_queue_size: int = Field(
        default=128, ge=1,
        description="Requests that may wait per graph queue; when full, requests get 503 'overloaded' "
        "with Retry-After at once.",
    )
    max_queue_wait_ms: float = Field(
        default=1000.0, ge=0.0, le=3_600_000.0,
        description="Refuse (503 'overloaded', Retry-After) a request that the work already queued for a graph would "
        "keep waiting longer than this, at the measured time per row; 0 = bound the queues in requests only.",
    )
    request_timeout_s: float = Field(
        default=30.0, ge=0.0, le=86_400.0,
        description="Deadline for a whole request (body upload included): past it the request is cancelled "
        "(dropped from the batching queue if still waiting) and answered 504 'timeout'. 0 = no deadline.",
    )
    image_encoder_instances: int = Field(
        default=1, ge=1, le=16,
        description="Inference threads of the image encoder on its one queue (Triton's instance_group count): with 2, "
        "a second batch starts beside a running one, each then on its own session with half the threads, while a "
        "batch that runs alone keeps every thread. 2 CPU cores, text cache off: 16 clients 116-117 req/s instead "
        "of 108 (LitServe's best 117-118) but p99 231-256 ms instead of 199; 1 client p50 13.3-14.9 ms instead "
        "of 13.1; default 1.",
    )
    text_cache_size: int = Field(
        default=1024, ge=0,
        description="LRU cache of text-encoder outputs keyed by token ids, in entries (0 = off). "
        "MiniLM: 18 KB per 12-token text, 98 KB at 64 tokens.",
    )

    def resolved_intra_op_threads(self) -> int:
        return self.intra_op_threads or container_cpus()

    def resolved_decode_threads(self) -> int:
        return self.decode_threads or container_cpus()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# MMFUSION_* variables read by tools beside the server (benchmarks, browser tests), not settings.
TOOL_VARIABLES = frozenset({"MMFUSION_BENCH_RUN", "MMFUSION_CHROMIUM"})


# How alike a variable must be to a setting's name to be refused as its typo (difflib ratio): one or two
# characters off (MMFUSION_API_KEY for _API_KEYS: 0.97; _REQUEST_TIMEOUT for _REQUEST_TIMEOUT_S: 0.96), not
# a different word (MMFUSION_VERSION is 0.82 from _PRECISION, MMFUSION_BUNDLE_DIR 0.88 from _BUNDLE).
TYPO_RATIO = 0.93


def misspelled_variables(environ: Mapping[str, str]) -> list[str]:
    """``MMFUSION_*`` variables that are not settings but are one or two characters from one
    (``MMFUSION_API_KEY`` for ``MMFUSION_API_KEYS``), each with the setting meant. pydantic-settings
    ignores unknown variables, so such a typo silently kept a default: with the keys variable
    misspelled, the server ran with no keys. Other unknown names are only warned about
    (:func:`unknown_variables`): a deployment may set its own ``MMFUSION_VERSION``."""
    names = _setting_variables()
    found = []
    for var in _unknown(environ, names):
        close = difflib.get_close_matches(var.upper(), names, n=1, cutoff=TYPO_RATIO)
        if close:
            found.append(f"{var} is not a setting; did you mean {close[0]}?")
    return found


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``MMFUSION_*`` variables that are not settings (nor the tools' own), typos included."""
    return _unknown(environ, _setting_variables())


def _setting_variables() -> set[str]:
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def _unknown(environ: Mapping[str, str], names: set[str]) -> list[str]:
    return [var for var in sorted(environ) if var.upper().startswith(ENV_PREFIX)
            and var.upper() not in names and var.upper() not in TOOL_VARIABLES]


def describe_validation_error(exc: ValidationError) -> str:
    """One line per invalid setting, named as the user set it (``MMFUSION_PORT=99999: ...``)."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = f"={value}" if isinstance(value, str | int | float) else ""
        parts.append(f"{ENV_PREFIX}{field.upper()}{shown}: {err['msg']}")
    return "invalid settings: " + "; ".join(parts)


class SettingsError(ValueError):
    """Settings the environment gets wrong, one problem per entry of ``problems``."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def environment_settings() -> Settings:
    """:func:`get_settings`, refusing the environment's mistakes first: a misspelled variable (which
    would silently keep a default) or an invalid value, as one ``SettingsError`` whose problems name the
    variables. ``mmfusion serve`` and ``uvicorn app.main:app`` both start through here."""
    typos = misspelled_variables(os.environ)
    if typos:
        raise SettingsError(typos)
    try:
        return get_settings()
    except ValidationError as exc:
        raise SettingsError([describe_validation_error(exc)]) from None

