"""``python -m gateway regenerate {ocr|clip} ASSET_ID [--api-key KEY]``: the regenerate endpoints from a shell.

Same flow and same checks as ``POST /ai/assets/{id}/{ocr|clip}`` (the key's user must own the asset), with the
gateway's configured backends (``GATEWAY_BACKENDS``: the in-process models by default) and Immich's database
(``DB_SEARCH_URL`` or Immich's ``DB_*`` variables). The API key comes from ``--api-key`` or, better (a command
line is visible to every user of the machine), the environment variable ``IMMICH_API_KEY``; it is never
printed or logged. Prints the endpoint's JSON body; exit status 0 on success, 1 when the regenerate failed
(the reason on stderr), 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import orjson
from pydantic import ValidationError

from ai_service.errors import ServiceError, http_status
from gateway.logs import configure_logging, go_direct
from gateway.routing import ConfigError
from gateway.search.credentials import Credential, CredentialKind
from gateway.search.regenerate import RegenerateKind, parse_asset_id
from gateway.settings import GatewaySettings, describe_errors
from gateway.wiring import Gateway

API_KEY_ENV = "IMMICH_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway regenerate",
        description="Re-run OCR or CLIP on one photo and write the result into Immich's tables, as its owner.",
    )
    parser.add_argument("kind", choices=["ocr", "clip"], help="what to regenerate")
    parser.add_argument("asset_id", metavar="ASSET_ID", help="the asset's id (a UUID, as in the web URL)")
    parser.add_argument(
        "--api-key",
        help=f"the owner's Immich API key (default: ${API_KEY_ENV}; prefer the variable, a command line is public)",
    )
    parser.add_argument("--immich-url", help="Immich's server URL (default: GATEWAY_IMMICH__URL)")
    return parser


async def _run(settings: GatewaySettings, kind: str, asset_id: str, api_key: str) -> tuple[int, dict[str, Any]]:
    # The same parts as the running gateway (gateway/wiring.py); no health checks and no migration from a
    # one-off command: the writes need only Immich's own tables.
    gateway = Gateway.build(settings)
    assert gateway.search is not None  # main() checked GATEWAY_IMMICH__URL
    try:
        await gateway.start(serving=False)
        body = await gateway.search.regenerator.run(
            RegenerateKind(kind), Credential(CredentialKind.API_KEY, api_key), parse_asset_id(asset_id)
        )
        return 0, body
    except ServiceError as exc:
        return 1, {"status": http_status(exc), "detail": exc.detail}
    finally:
        await gateway.close()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV, "")
    if not api_key:
        print(f"gateway regenerate: no API key: pass --api-key or set {API_KEY_ENV}", file=sys.stderr)
        return 2
    if args.immich_url:
        # Through the environment, so the other GATEWAY_IMMICH__* settings still apply.
        os.environ["GATEWAY_IMMICH__URL"] = args.immich_url
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        print(f"gateway regenerate: invalid configuration:\n{describe_errors(exc)}", file=sys.stderr)
        return 2
    if settings.immich.url is None:
        print("gateway regenerate: set GATEWAY_IMMICH__URL (or --immich-url) to Immich's server URL", file=sys.stderr)
        return 2
    # Logs go to stderr; stdout carries only the JSON result.
    configure_logging(settings.log_level, settings.log_format, settings.log_queue_size)
    try:
        status, body = asyncio.run(_run(settings, args.kind, args.asset_id, api_key))
    except ConfigError as exc:
        print(f"gateway regenerate: {exc}", file=sys.stderr)
        return 2
    finally:
        go_direct()  # drain the log queue before the result is printed
    if status == 0:
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
    else:
        print(f"gateway regenerate: HTTP {body['status']}: {body['detail']}", file=sys.stderr)
    return status
