"""The serving application's configuration: the ``args`` of the Serve app, validated.

A Serve config file (``serve run``, ``serve deploy``, KubeRay ``serveConfigV2``) passes its
application ``args`` to ``saescope.service.app:build_app``, which validates them with
:class:`AppConfig`. Unknown fields are errors, and every error names the field::

    applications:
      - name: saescope
        import_path: saescope.service.app:build_app
        args:
          model: default
          saes:
            - {sae_id: smollm2-135m-l15-topk, path: default}   # the SAE shipped in the package
            - {sae_id: mine, path: ~/runs/mine/final}
          num_gpus: 0
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saescope.service import wire_limits
from saescope.service.access import AccessPolicy
from saescope.service.types import Limits
from saescope.training import default_sae

_SAE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SaeSpec(_Strict):
    """One SAE to load."""

    sae_id: str
    """The name callers use for it (letters, digits, ``.``, ``_``, ``-``)."""
    path: str
    """A saescope checkpoint, or a SAELens or sparsify folder; ``~`` and ``$VARS`` are expanded.
    ``default``: the default SAE shipped in the package (``saescope.training.default_sae``)."""

    @field_validator("sae_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not _SAE_ID.match(v):
            raise ValueError(
                "must be 1–128 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        return v

    @property
    def resolved_path(self) -> Path:
        return default_sae.resolve_sae_path(self.path)


class LimitsConfig(_Strict):
    """Per-call limits; requests over them fail with OUT_OF_RANGE naming the limit."""

    max_prompts: int = Field(default=Limits.max_prompts, ge=1)
    """Prompts per GetFeatureActivations call."""
    max_tokens_per_prompt: int = Field(default=Limits.max_tokens_per_prompt, ge=1)
    """Tokens of one rendered prompt."""
    max_top_k: int = Field(default=Limits.max_top_k, ge=1)
    """Largest top_k / top_n / neighbours / top_logits a call may ask for."""
    max_new_tokens: int = Field(default=Limits.max_new_tokens, ge=1)
    """Tokens one generation may produce."""
    max_features: int = Field(default=Limits.max_features, ge=1)
    """Chosen features per activation call, and interventions per generation."""
    max_contrast_prompts: int = Field(default=Limits.max_contrast_prompts, ge=2)
    """Prompts per side of a contrast search."""
    max_stop_strings: int = Field(default=Limits.max_stop_strings, ge=0)
    """Stop strings per generation (each is searched for after every token)."""
    max_stop_string_chars: int = Field(default=Limits.max_stop_string_chars, ge=1)
    """Characters of one stop string."""
    max_tokens_per_call: int = Field(default=Limits.max_tokens_per_call, ge=1)
    """Tokens of all prompts of one activation call, or of both sides of a contrast search."""
    max_response_bytes: int = Field(
        default=Limits.max_response_bytes, ge=2**16, le=wire_limits.MAX_MESSAGE_BYTES
    )
    """Estimated size of one activation response, checked before any work; at most the
    message size the gRPC proxy sends (``wire_limits``; common clients refuse more)."""

    def to_domain(self) -> Limits:
        return Limits(**self.model_dump())


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of the model deployment (replaces a fixed ``num_replicas``)."""

    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas kept running."""
    max_replicas: int = Field(default=1, ge=1)
    """Most replicas started under load."""
    target_ongoing_requests: float = Field(default=8, gt=0)
    """Ongoing requests per replica that autoscaling aims for."""
    initial_replicas: int | None = Field(default=None, ge=0)
    """Replicas a new deployment starts with (a first deploy, the new cluster of a KubeRay
    NewCluster upgrade, which should take over at full size); default: ``min_replicas``."""
    upscale_delay_s: float = Field(default=30.0, ge=0)
    """How long load must stay above target before replicas are added."""
    downscale_delay_s: float = Field(default=600.0, ge=0)
    """How long load must stay below target before replicas are removed."""
    look_back_period_s: float = Field(default=30.0, gt=0)
    """The window over which ongoing requests are averaged for those decisions."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) must lie in [min_replicas, max_replicas] = "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class AppConfig(_Strict):
    """Arguments of the saescope Serve application (``build_app(args)``)."""

    # ---- what is served ----
    model: str = "default"
    """Hugging Face model id or local directory; ``default`` is SmolLM2-135M-Instruct, cached."""
    saes: list[SaeSpec] = Field(min_length=1)
    """SAEs to load; at least one (``saescope serve`` trains the default one when none is given)."""
    default_sae_id: str | None = None
    """The SAE a request with an empty ``sae_id`` means; default: the first of ``saes``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; ``auto`` picks CUDA when present."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model weights' dtype (SAEs run in float32)."""
    cache_dir: str | None = None
    """Cache of the default model; default ``$SAESCOPE_CACHE`` or ``~/.cache/saescope``."""
    limits: LimitsConfig = LimitsConfig()
    """Per-call limits."""
    sae_memory_budget_mib: float | None = Field(default=None, gt=0)
    """Memory for the SAEs' tensors in one replica (MiB): SAEs beyond it are loaded on demand
    and the least recently used evicted (``sae_pool``); default: every SAE stays loaded."""

    # ---- resources and scaling ----
    num_gpus: float = Field(default=0, ge=0)
    """GPUs per replica: 1 on a GPU node, 0 on a laptop or CI."""
    num_cpus: float = Field(default=1, ge=0)
    """CPUs Ray reserves per replica."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads of torch in a replica; default: torch's own choice."""
    metrics_sync_timing: bool = False
    """Time SAE encodes on a GPU too (``saescope_sae_encode_s``). That needs a device sync
    around each encode, so it is off by default; on a CPU encodes are always timed."""
    num_replicas: int = Field(default=1, ge=1)
    """Fixed number of replicas (ignored when ``autoscaling`` is set)."""
    autoscaling: AutoscalingConfig | None = None
    """Autoscale between ``min_replicas`` and ``max_replicas`` instead."""
    max_replicas_per_node: int | None = Field(default=None, ge=1)
    """Most replicas on one Ray node (1: spread them, so losing a node loses one replica);
    default: Serve places them as it likes (it spreads by default, without a guarantee)."""
    max_ongoing_requests: int = Field(default=32, ge=1)
    """Requests one replica works on at once (batching needs several)."""
    max_queued_requests: int = Field(default=256, ge=-1)
    """Requests waiting for a replica before callers get RESOURCE_EXHAUSTED; -1: unbounded."""

    # ---- batching ----
    max_batch_size: int = Field(default=16, ge=1)
    """Most activation requests one forward pass serves."""
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)
    """How long an idle replica waits for more activation calls to join the first one (a busy
    replica's next batch is simply what queued meanwhile)."""
    max_decode_rows: int = Field(default=32, ge=1)
    """Most generation rows (steered + baseline branches) one decode step advances together."""
    forward_slice_tokens: int | None = Field(default=None, ge=1)
    """Activation and contrast work is cut into forward passes of about this many tokens, and
    concurrent calls take turns between them, so a big call does not hold up small ones;
    default: per device (``activations.SLICE_TOKENS``)."""

    # ---- access (saescope.service.access) ----
    api_key_env: str | None = None
    """Name of the environment variable holding the API key, or several separated by commas or
    newlines (all valid at once: rotate by adding the new key, then removing the old); read
    when a replica starts."""
    api_keys_file: str | None = None
    """A file of API keys (one or more, as above; ``#`` comments), e.g. a mounted Secret; it is
    re-read when it changes, so keys rotate without a restart. ``~``/``$VARS`` expanded."""
    allow_remote_without_key: bool = False
    """With no key configured, the service answers only callers on loopback (Serve's gRPC proxy
    listens on every interface); true lifts that, for a service behind a gateway that
    authenticates callers itself."""

    @field_validator("saes")
    @classmethod
    def _unique_ids(cls, v: list[SaeSpec]) -> list[SaeSpec]:
        ids = [s.sae_id for s in v]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"sae_id must be unique; repeated: {', '.join(dupes)}")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            raise ValueError(f"not an environment variable name: {v!r}")
        return v

    @model_validator(mode="after")
    def _default_known(self) -> Self:
        ids = [s.sae_id for s in self.saes]
        if self.default_sae_id is not None and self.default_sae_id not in ids:
            raise ValueError(f"default_sae_id: {self.default_sae_id!r} is not one of {ids}")
        return self

    # ---- derived ----
    @property
    def sae_paths(self) -> dict[str, Path]:
        return {s.sae_id: s.resolved_path for s in self.saes}

    @property
    def sae_memory_budget_bytes(self) -> int | None:
        mib = self.sae_memory_budget_mib
        return None if mib is None else int(mib * 2**20)

    @property
    def requires_key(self) -> bool:
        """Whether callers must send an API key (``api_key_env`` or ``api_keys_file`` is set)."""
        return self.api_key_env is not None or self.api_keys_file is not None

    def access_policy(self) -> AccessPolicy:
        """The replica's access policy; a ``ConfigError`` names a key setting that yields no key."""
        keys_file = None
        if self.api_keys_file is not None:
            keys_file = Path(os.path.expandvars(self.api_keys_file)).expanduser()
        try:
            return AccessPolicy.from_env(
                self.api_key_env,
                keys_file,
                allow_remote_without_key=self.allow_remote_without_key,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def deployment_options(self) -> dict[str, Any]:
        """Options of the Serve deployment (``Deployment.options(**...)``)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
        }
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if self.autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        return options


class ConfigError(ValueError):
    """Invalid application arguments; the message names each bad field."""


def load_app_config(args: dict[str, Any] | AppConfig) -> AppConfig:
    """Validate Serve application ``args``; a :class:`ConfigError` names every bad field."""
    if isinstance(args, AppConfig):
        return args
    try:
        return AppConfig.model_validate(args)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _describe(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: {msg}")
    return "invalid saescope app config: " + "; ".join(lines)
