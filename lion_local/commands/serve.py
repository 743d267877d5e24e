"""`lion-local serve NAME`: one server of a config in the foreground, for a service job to share.

With --publish (slurm/serve.sh), the endpoint is published once the server is healthy, with the
key the server requires, for runs whose config makes that server external; the file is withdrawn
when the server stops. Who may use the server is serving/access.py's rule: a vLLM server with no
configured key gets a random one per start, passed in the environment, never on a command line.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack

from lion_local.config import Config, ConfigError
from lion_local.endpoints.access import check_access, check_launchers, check_models_exist, endpoint_dir, server_key_for
from lion_local.endpoints.servers import server_named, wanted_server
from lion_local.offline import offline_environ
from lion_local.run.layout import RunDir
from lion_local.smoke.tiny_models import ensure_tiny_models
from serving import server_launch, server_process
from serving.commands import request_model_name
from serving.process import ServerError
from serving.published import published_endpoint, reachable_host
from serving.startup import wait_until_healthy


def serve_server(
    config: Config, name: str, host: str | None, publish: bool, dry_run: bool, announce: Callable[[str], None]
) -> None:
    """Run server `name` (a server of the config or a role's) until interrupted; `announce` gets
    the lines a user of the command reads (where it serves, where it is published)."""
    server_name = server_named(config, name)
    server = config.servers[server_name]
    if server.engine == "external":
        where = ", ".join(server.base_urls) or f"endpoints published in {endpoint_dir(config, server_name)}"
        raise ConfigError(
            f"servers.{server_name}.engine: external ({where}): nothing to start; "
            "serve it from a config that gives its engine and model"
        )
    if host is not None:
        server.host = host
    started_for = "service" if publish else "foreground"
    if dry_run:
        api_key = server_key_for(config, server_name, started_for)
        launch = server_launch(server, api_key, offline_environ())
        announce(shlex.join(launch.command) + key_note(server.api_key_env, api_key))
        return
    check_models_exist(config, [server_name])
    check_launchers(config, [server_name])
    check_access(config, server_name, started_for)
    ensure_tiny_models(config)
    # Replicas of a job array share the run directory: one log each.
    log_path = RunDir(config.run_dir).serve_log(server_name, os.environ.get("SLURM_JOB_ID"))
    wanted = wanted_server(config, server_name, log_path, started_for=started_for)
    process, launch = server_process(wanted)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    process.start()
    try:
        wait_until_healthy([process])
        base_url = f"http://{reachable_host(server.host)}:{launch.port}/v1"
        with ExitStack() as stack:
            if publish:
                directory = endpoint_dir(config, server_name)
                model = request_model_name(server)
                path = stack.enter_context(published_endpoint(server_name, directory, base_url, model, wanted.api_key))
                announce(f"{server_name} published in {path}")
            announce(f"{server_name} serving at {base_url} (log: {log_path}); Ctrl-C stops it")
            code = process.process.wait()
            raise ServerError(f"{server_name} server exited with code {code}; log: {log_path}")
    except KeyboardInterrupt:
        pass
    finally:
        process.stop()


def key_note(variable: str | None, api_key: str | None) -> str:
    """What `serve --dry-run` says of the key the server will require (never the key itself)."""
    if not api_key:
        return " (no API key)"
    if variable:
        return f" (API key from ${variable}, in the environment)"
    return " (a random API key made at start, in the environment, published with the endpoint)"
