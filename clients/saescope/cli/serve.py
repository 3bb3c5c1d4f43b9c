"""``saescope serve``: run the service locally — Ray, Serve's gRPC proxy, the saescope app.

``saescope serve [--config NAME|serve.yaml] [--grpc-port 9000] [--http-port 8000] [--model M]
[--sae ID=PATH …]`` starts Ray on this machine, Serve with its gRPC proxy and its HTTP proxy
(the web explorer at ``/saescope/``, and ``/-/healthz``), deploys the app, prints how to call it
and serves until Ctrl-C. ``--config`` takes a Serve config file or a shipped one by name
(``serve-default``: the same document ``serve run`` and KubeRay take); flags override it. With
no SAE configured, the default SAE is served: the one shipped inside the package
(``saescope.training.default_sae``), so nothing is trained. Ray and the service are imported
inside the handler.

Loopback unless told otherwise: the HTTP proxy binds ``--host`` (127.0.0.1 by default), and
Serve's gRPC proxy listens on every interface but, without an API key, the service answers only
loopback callers. Serving beyond loopback (``--host 0.0.0.0``) therefore needs a key:
``--api-key-env NAME`` names the environment variable holding it (or several, comma-separated,
to rotate) — never the key itself, which would show in ``ps``. Ray's dashboard and job API are
not started.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SAE_ID = "smollm2-135m-l15-topk"  # saescope.training.default_sae.SAE_ID (no torch here)
APP_NAME = "saescope"
IMPORT_PATH = "saescope.service.app:build_app"
SERVICER = "saescope.api.v1.saescope_pb2_grpc.add_SaeScopeServicer_to_server"
# Run by Serve in its proxy after the servicer: makes cancelled streams reach the replica.
PROXY_PATCH = "saescope.service.proxy_patch.install"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model and its SAEs over gRPC (Ray Serve, locally)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--config",
        metavar="NAME|SERVE.yaml",
        help="a Serve config: a shipped one by name (e.g. serve-default) or a file",
    )
    p.add_argument("--grpc-port", type=int, help="gRPC port (default: the config's, else 9000)")
    p.add_argument(
        "--http-port", type=int, help="HTTP port: the web explorer and /-/healthz (default 8000)"
    )
    p.add_argument(
        "--host",
        help="HTTP bind address (default: the config's, else 127.0.0.1); beyond loopback, "
        "an API key is required",
    )
    p.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="environment variable holding the API key callers must send (several: "
        "comma-separated, for rotation); required with a non-loopback --host",
    )
    p.add_argument("--model", help="Hugging Face id, local directory or 'default'")
    p.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="ID=PATH",
        help=(
            "an SAE to serve as ID: a saescope checkpoint, or a SAELens or sparsify folder "
            "(repeatable; replaces the config's SAEs)"
        ),
    )
    p.add_argument("--num-gpus", type=float, help="GPUs per replica (default 0)")
    p.add_argument("--metrics-port", type=int, help="Ray's Prometheus metrics port")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    import ray
    from ray import serve

    from saescope.service import wire_limits
    from saescope.service.app import build_app
    from saescope.service.config import load_app_config

    app = build_app(plan.app_args)  # validates the args before anything starts
    load_app_config(plan.app_args).access_policy()  # keys that resolve to none: fail here
    init: dict[str, Any] = {"include_dashboard": False}
    if args.metrics_port:
        init["_metrics_export_port"] = args.metrics_port
    ray.init(**init)
    try:
        serve.start(
            proxy_location="EveryNode",
            http_options={"host": plan.host, "port": plan.http_port},
            grpc_options={
                "port": plan.grpc_port,
                "grpc_servicer_functions": [SERVICER, PROXY_PATCH],
            },
            controller_options=wire_limits.controller_options(),  # bounds gRPC message size
        )
        serve.run(app, name=APP_NAME, route_prefix=f"/{APP_NAME}")
        _print_usage(plan)
        _stop_on_signals()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nsaescope serve: shutting down", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (``docker stop``, ``kill``) both shut down cleanly.

    Set explicitly: a process started in the background inherits SIGINT ignored.
    """

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


# ---- what to serve ---------------------------------------------------------------------------
@dataclass
class _Plan:
    app_args: dict[str, Any]
    grpc_port: int
    http_port: int
    host: str


def _plan(args: argparse.Namespace) -> _Plan:
    """Config file, then flags, then the default SAE if none is named."""
    from saescope.cli import presets

    app_args: dict[str, Any] = {}
    grpc_port, http_port, host = 9000, 8000, "127.0.0.1"
    if args.config is not None:
        app_args, grpc_port, http_port, host = _read_serve_config(presets.resolve(args.config))
    grpc_port = args.grpc_port or grpc_port
    http_port = args.http_port or http_port
    host = args.host or host
    if args.model:
        app_args["model"] = args.model
    if args.num_gpus is not None:
        app_args["num_gpus"] = args.num_gpus
    if args.sae:
        app_args["saes"] = [_parse_sae(s) for s in args.sae]
    if args.api_key_env:
        app_args["api_key_env"] = _key_env(args.api_key_env)
    _check_exposure(host, app_args)
    if not app_args.get("saes"):
        if app_args.get("model", "default") != "default":
            raise ValueError("--sae: name an SAE for a model other than the default")
        app_args["saes"] = [{"sae_id": DEFAULT_SAE_ID, "path": "default"}]
    return _Plan(app_args, grpc_port, http_port, host)


def _key_env(name: str) -> str:
    """``--api-key-env``: the name of a set, non-empty environment variable."""
    if not name.isidentifier():  # not echoed: it may be a key given by mistake
        raise ValueError(
            "--api-key-env: expects the NAME of an environment variable holding the key, "
            "never the key itself"
        )
    if not os.environ.get(name, "").strip(" ,\n"):
        raise ValueError(f"--api-key-env: environment variable {name} is not set (or empty)")
    return name


def _check_exposure(host: str, app_args: dict[str, Any]) -> None:
    """Refuse to serve beyond loopback without a key (or the config's explicit opt-out)."""
    keyed = app_args.get("api_key_env") or app_args.get("api_keys_file")
    if keyed or app_args.get("allow_remote_without_key") or _is_loopback(host):
        return
    raise ValueError(
        f"--host {host}: serving beyond loopback needs an API key; pass --api-key-env NAME "
        "(an environment variable holding the key), or bind --host 127.0.0.1"
    )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable


def _parse_sae(text: str) -> dict[str, str]:
    sae_id, sep, path = text.partition("=")
    if not sep or not sae_id or not path:
        raise ValueError(f"--sae: expected ID=PATH, got {text!r}")
    return {"sae_id": sae_id, "path": path}


def _read_serve_config(path: Path) -> tuple[dict[str, Any], int, int, str]:
    """The saescope app's args and the proxies' ports from a Serve config file."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file: {path}")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    apps = [a for a in schema.applications if a.import_path == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"--config: expected one application with import_path {IMPORT_PATH}")
    http = schema.http_options
    return dict(apps[0].args), schema.grpc_options.port, http.port, http.host


def _print_usage(plan: _Plan) -> None:
    port = plan.grpc_port
    browse_host = "localhost" if plan.host in ("0.0.0.0", "::", "127.0.0.1") else plan.host
    key_env = plan.app_args.get("api_key_env")
    access = (
        f"Callers send a key from ${key_env} as metadata x-api-key (grpcurl -H 'x-api-key: …';\n"
        "the SDK: api_key=... or SAESCOPE_API_KEY)."
        if key_env
        else "No API key: only callers on this machine (loopback) are answered."
    )
    access += (
        "\nThe explorer's pages ask for the key; HTTP callers send it as header x-api-key."
        if key_env
        else ""
    )
    print(
        f"""
saescope is serving on gRPC port {port} (health: http://{plan.host}:{plan.http_port}/-/healthz,
and grpc.health.v1 on the gRPC port). {access}

  The web explorer: http://{browse_host}:{plan.http_port}/{APP_NAME}/
  (the same API as JSON: POST http://{browse_host}:{plan.http_port}/{APP_NAME}/api/v1/<Rpc>)

  grpcurl -plaintext -H 'application: {APP_NAME}' \\
      -d '{{"prompts": [{{"text": "The cat sat on the mat"}}], "top_k_per_token": 5}}' \\
      localhost:{port} saescope.api.v1.SaeScope/GetFeatureActivations

  python -c 'from saescope.client import Client
  with Client("localhost:{port}") as c: print(c.activations("The cat sat on the mat", top_k=5))'

Ctrl-C stops it.""",
        flush=True,
    )
