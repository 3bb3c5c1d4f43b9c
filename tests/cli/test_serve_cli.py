"""``saescope serve``'s planning (config file, flags, the default SAE, the API key and the bind
checks) and ``fetch-model``'s registration; no Ray is started here (the gRPC tests cover the
running service)."""

from __future__ import annotations

from pathlib import Path

import pytest

from saescope.cli import serve
from saescope.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "training" / "saescope" / "configs" / "serve-default.yaml"


def plan(*argv: str) -> serve._Plan:
    return serve._plan(build_parser().parse_args(["serve", *argv]))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path))
    return tmp_path


def test_config_file_then_flags(cache: Path) -> None:
    p = plan("--config", str(DEFAULT_CONFIG))
    assert (p.grpc_port, p.http_port, p.host) == (9000, 8000, "127.0.0.1")
    assert p.app_args["model"] == "default" and p.app_args["num_gpus"] == 0
    p = plan(
        "--config", str(DEFAULT_CONFIG), "--grpc-port", "9100", "--sae", "a=/x", "--num-gpus", "1"
    )
    assert (p.grpc_port, p.app_args["saes"], p.app_args["num_gpus"]) == (
        9100,
        [{"sae_id": "a", "path": "/x"}],
        1,
    )


def test_no_sae_means_the_shipped_default_sae(cache: Path) -> None:
    p = plan()
    assert p.app_args == {"saes": [{"sae_id": serve.DEFAULT_SAE_ID, "path": "default"}]}
    assert (p.grpc_port, p.http_port, p.host) == (9000, 8000, "127.0.0.1")
    # Nothing was trained or copied into the cache: the SAE is the package's.
    assert not list(cache.iterdir())


def test_the_cli_names_the_shipped_sae_without_importing_torch() -> None:
    from saescope.training import default_sae

    assert serve.DEFAULT_SAE_ID == default_sae.SAE_ID


def test_mistakes_name_the_flag(cache: Path) -> None:
    with pytest.raises(ValueError, match="--sae: expected ID=PATH"):
        plan("--sae", "no-equals-sign")
    with pytest.raises(ValueError, match="--sae: name an SAE"):
        plan("--model", "gpt2")
    with pytest.raises(FileNotFoundError, match="--config"):
        plan("--config", str(cache / "missing.yaml"))


def test_fetch_model_is_a_command() -> None:
    args = build_parser().parse_args(["fetch-model", "--cache-dir", "/tmp/x"])
    assert args.cache_dir == Path("/tmp/x") and callable(args.func)


# ---- loopback unless there is a key ----------------------------------------------------------
KEYS_ENV = "SAESCOPE_SERVE_TEST_KEYS"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "my-host.example"])
def test_a_non_loopback_bind_without_a_key_is_refused(cache: Path, host: str) -> None:
    with pytest.raises(ValueError, match=f"--host {host}: .*--api-key-env NAME"):
        plan("--host", host, "--sae", "a=/x")


def test_a_config_binding_all_interfaces_without_a_key_is_refused(
    cache: Path, tmp_path: Path
) -> None:
    text = DEFAULT_CONFIG.read_text().replace("host: 127.0.0.1", "host: 0.0.0.0")
    exposed = tmp_path / "serve.yaml"
    exposed.write_text(text)
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0: serving beyond loopback"):
        plan("--config", str(exposed))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_key(cache: Path, host: str) -> None:
    assert "api_key_env" not in plan("--host", host, "--sae", "a=/x").app_args


def test_a_key_from_the_named_variable_allows_any_bind(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEYS_ENV, "new-key,old-key")
    p = plan("--host", "0.0.0.0", "--api-key-env", KEYS_ENV, "--sae", "a=/x")
    assert p.app_args["api_key_env"] == KEYS_ENV and p.host == "0.0.0.0"


def test_the_key_option_takes_a_variable_name_never_a_key(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)
    with pytest.raises(ValueError, match=f"--api-key-env: environment variable {KEYS_ENV}"):
        plan("--api-key-env", KEYS_ENV, "--sae", "a=/x")
    with pytest.raises(ValueError, match="never the key itself") as e:
        plan("--api-key-env", "sk-live-0123-secret", "--sae", "a=/x")
    assert "sk-live" not in str(e.value)


def test_ray_starts_without_its_dashboard(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No dashboard, hence no job API: nothing that runs code for a caller is reachable."""
    import ray

    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def fake_init(**kwargs: object) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(ray, "init", fake_init)
    args = build_parser().parse_args(["serve", "--sae", "a=/x"])
    with pytest.raises(Stop):
        serve.run(args)
    assert seen["include_dashboard"] is False
