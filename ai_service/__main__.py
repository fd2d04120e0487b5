"""Command line: ``python -m ai_service [serve] --host H --port P`` | ``models …`` | ``settings``."""

from __future__ import annotations

import argparse
import logging
import sys

from ai_service.settings import AIServiceSettings


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ai_service", description="Run the AI service.")
    parser.add_argument("--host", help="listen address (AI_SERVICE_HOST)")
    parser.add_argument("--port", type=int, help="listen port (AI_SERVICE_PORT)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = AIServiceSettings(**overrides)
    problem = settings.exposure_problem()
    if problem is not None:
        print(f"ai_service: {problem}", file=sys.stderr)
        return 2
    from ai_service.runtime.workers import configure_logging, serve_workers

    configure_logging(settings)
    if not settings.mtphotos_api_key:
        logging.getLogger("ai_service").info("MT Photos API is off (AI_SERVICE_MTPHOTOS_API_KEY is empty)")
    if settings.workers > 1:
        return serve_workers(settings)

    import uvicorn

    from ai_service.app import create_app
    from ai_service.runtime.http_server import uvicorn_http

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=uvicorn_http(settings.http),  # type: ignore[arg-type]  # a protocol factory, as uvicorn calls it
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )
    return 0


def _print_settings() -> int:
    settings = AIServiceSettings()
    for name, field in AIServiceSettings.model_fields.items():
        value = "<hidden>" if field.repr is False else getattr(settings, name)
        print(f"AI_SERVICE_{name.upper()}={value}\n    {field.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "models":
        from ai_service.models.cli import run

        return run(argv[1:], AIServiceSettings())
    if argv and argv[0] == "settings":
        return _print_settings()
    if argv and argv[0] == "serve":
        argv = argv[1:]
    return _serve(argv)


if __name__ == "__main__":
    sys.exit(main())
