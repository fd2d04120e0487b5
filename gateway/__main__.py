"""Command line: ``python -m gateway [--host H] [--port P]`` | ``python -m gateway settings`` |
``python -m gateway regenerate {ocr|clip} ASSET_ID [--api-key KEY]`` (see gateway/search/cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pydantic import BaseModel, ValidationError

from db.settings import ENV_PREFIX as DB_ENV_PREFIX
from db.settings import DbSearchSettings
from gateway.backends.http import redact_url
from gateway.settings import GatewaySettings, describe_errors


def _print_settings() -> int:
    settings = GatewaySettings()
    for name, field in GatewaySettings.model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, BaseModel | dict | list):
            text = json.dumps(_masked(_plain(value)), ensure_ascii=False, separators=(",", ":"))
        else:
            text = str(value)
        print(f"GATEWAY_{name.upper()}={text}\n    {field.description}")
    # Search (the front's settings included) is configured in db/settings.py; the URL prints as a masked secret.
    search = DbSearchSettings()
    for name, field in DbSearchSettings.model_fields.items():
        print(f"{DB_ENV_PREFIX}{name.upper()}={getattr(search, name)}\n    {field.description}")
    return 0


def _plain(value: Any, *, nested: bool = False) -> Any:
    """JSON-ready data; pydantic's JSON mode writes a SecretStr (an API key) as '**********'.
    Unset fields show as null at the top level, and are left out of the entries of a dict (backends)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=nested)
    if isinstance(value, dict):
        return {str(k): _plain(v, nested=True) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, nested=True) for v in value]
    return value


def _masked(value: Any) -> Any:
    """Every URL as /status and the logs show it: user:password and query values masked."""
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "settings":
        return _print_settings()
    if argv and argv[0] == "regenerate":
        from gateway.search.cli import main as regenerate_main

        return regenerate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m gateway", description="Run the Immich ML gateway.")
    parser.add_argument("--host", help="listen address (GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (GATEWAY_PORT, default 3003)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    try:
        settings = GatewaySettings(**overrides)
    except ValidationError as exc:
        print(f"gateway: invalid configuration:\n{describe_errors(exc)}", file=sys.stderr)
        return 2

    from gateway.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format, settings.log_queue_size)

    import uvicorn

    from gateway.app import create_app
    from gateway.routing import ConfigError

    try:
        app = create_app(settings)
    except ConfigError as exc:
        logging.getLogger("gateway").error(str(exc))
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    from ai_service.runtime.http_server import uvicorn_http

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        http=uvicorn_http(settings.http),  # type: ignore[arg-type]  # a protocol factory, as uvicorn calls it
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
