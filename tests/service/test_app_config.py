"""The serving configuration: the shipped Serve config validates with Ray's schema and with
``AppConfig``; mistakes are errors that name the field; the builder turns args into a Serve app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from saescope.service import wire_limits
from saescope.service.config import ConfigError, load_app_config
from saescope.training import default_sae

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "training" / "saescope" / "configs"  # shipped as package data
CONFIGS = sorted(CONFIG_DIR.glob("serve-*.yaml"))
SAE = {"sae_id": "s", "path": "/tmp/s"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_configs_validate(path: Path) -> None:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "saescope.service.app:build_app"
    assert schema.grpc_options.grpc_servicer_functions == [
        "saescope.api.v1.saescope_pb2_grpc.add_SaeScopeServicer_to_server",
        "saescope.service.proxy_patch.install",
    ]
    cfg = load_app_config(app.args)
    assert cfg.saes and cfg.num_gpus == 0
    # The proxies bound gRPC messages as `saescope serve` does (Serve's default is 2 GiB).
    assert schema.controller_options is not None
    raw = yaml.safe_load(path.read_text())["controller_options"]
    assert raw == wire_limits.controller_options()


def test_default_config_serves_the_default_sae() -> None:
    raw = yaml.safe_load((CONFIG_DIR / "serve-default.yaml").read_text())
    cfg = load_app_config(raw["applications"][0]["args"])
    assert cfg.model == "default" and raw["grpc_options"]["port"] == 9000
    # `path: default` is the SAE shipped in the package
    path = cfg.sae_paths["smollm2-135m-l15-topk"]
    assert path == default_sae.shipped_dir() and (path / "saescope.json").is_file()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"saes": [SAE], "modle": "x"}, "modle: unknown field"),
        ({"saes": [SAE], "limits": {"max_prompt": 3}}, "limits.max_prompt: unknown field"),
        ({"saes": [SAE], "limits": {"max_prompts": 0}}, "limits.max_prompts"),
        ({"saes": []}, "saes"),
        ({}, "saes"),
        ({"saes": [SAE, SAE]}, "sae_id must be unique"),
        ({"saes": [{"sae_id": "bad id!", "path": "/x"}]}, "saes.0.sae_id"),
        ({"saes": [SAE], "default_sae_id": "other"}, "default_sae_id"),
        ({"saes": [SAE], "device": "tpu"}, "device"),
        ({"saes": [SAE], "num_gpus": -1}, "num_gpus"),
        ({"saes": [SAE], "api_key_env": "not a name"}, "api_key_env"),
        ({"saes": [SAE], "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling"),
        (
            {"saes": [SAE], "autoscaling": {"max_replicas": 2, "initial_replicas": 3}},
            "initial_replicas (3) must lie in [min_replicas, max_replicas] = [1, 2]",
        ),
        ({"saes": [SAE], "autoscaling": {"upscale_delay_s": -1}}, "autoscaling.upscale_delay_s"),
    ],
)
def test_config_errors_name_the_field(args: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match="invalid saescope app config") as e:
        load_app_config(args)
    assert field in str(e.value)


def test_deployment_options_follow_the_config() -> None:
    cfg = load_app_config({"saes": [SAE], "num_gpus": 1, "max_queued_requests": 4})
    options = cfg.deployment_options()
    assert options["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1}
    assert (options["num_replicas"], options["max_queued_requests"]) == (1, 4)
    scaled = load_app_config({"saes": [SAE], "autoscaling": {"max_replicas": 4}})
    assert "num_replicas" not in scaled.deployment_options()
    assert scaled.deployment_options()["autoscaling_config"]["max_replicas"] == 4
    # Serve takes every field as it is (initial_replicas: a NewCluster upgrade at full size).
    from ray.serve.config import AutoscalingConfig as ServeAutoscaling

    full = {"min_replicas": 2, "max_replicas": 4, "initial_replicas": 4, "downscale_delay_s": 60}
    options = load_app_config({"saes": [SAE], "autoscaling": full}).deployment_options()
    serve_cfg = ServeAutoscaling(**options["autoscaling_config"])
    assert (serve_cfg.initial_replicas, serve_cfg.downscale_delay_s) == (4, 60)


def test_api_keys_come_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_app_config({"saes": [SAE], "api_key_env": "SAESCOPE_KEY_FOR_TEST"})
    assert cfg.requires_key
    monkeypatch.delenv("SAESCOPE_KEY_FOR_TEST", raising=False)
    with pytest.raises(ConfigError, match="api_key_env: environment variable"):
        cfg.access_policy()
    monkeypatch.setenv("SAESCOPE_KEY_FOR_TEST", "new,old")
    assert cfg.access_policy().keys() == ("new", "old")
    open_cfg = load_app_config({"saes": [SAE]})
    assert not open_cfg.requires_key and not open_cfg.access_policy().requires_key


def test_api_keys_file_is_expanded_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "keys").write_text("k1\nk2\n")
    monkeypatch.setenv("SAESCOPE_KEYS_DIR", str(tmp_path))
    cfg = load_app_config({"saes": [SAE], "api_keys_file": "$SAESCOPE_KEYS_DIR/keys"})
    assert cfg.requires_key and cfg.access_policy().keys() == ("k1", "k2")
    missing = load_app_config({"saes": [SAE], "api_keys_file": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="api_keys_file: cannot read"):
        missing.access_policy()


def test_the_default_config_is_loopback_only() -> None:
    raw = yaml.safe_load((CONFIG_DIR / "serve-default.yaml").read_text())
    cfg = load_app_config(raw["applications"][0]["args"])
    assert raw["http_options"]["host"] == "127.0.0.1"
    assert not cfg.requires_key and not cfg.allow_remote_without_key


def test_build_app_validates_and_binds() -> None:
    from ray.serve import Application

    from saescope.service.app import build_app

    assert isinstance(build_app({"saes": [SAE], "num_gpus": 0.5}), Application)
    with pytest.raises(ConfigError, match="modle: unknown field"):
        build_app({"saes": [SAE], "modle": "x"})
