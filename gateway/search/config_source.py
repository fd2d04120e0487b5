"""Where Immich's machine-learning settings are read from, cached for ``GATEWAY_IMMICH__CONFIG_TTL_S``.

Immich's order: a config file (``IMMICH_CONFIG_FILE``; then the database copy is ignored), else the
``system_metadata`` row, else the defaults. The gateway follows it: ``GATEWAY_IMMICH__CONFIG_FILE`` when set,
else the database.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from gateway.search.database import SearchDatabase
from gateway.search.immich_config import MlConfig, parse_ml_config
from gateway.settings import ImmichSettings


class ConfigFileError(RuntimeError):
    """The configured Immich config file cannot be read or parsed."""


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read Immich's config file {path}: {exc.strerror}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigFileError("Immich's config file is YAML but PyYAML is not installed") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigFileError(f"Immich's config file {path} is not valid YAML") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigFileError(f"Immich's config file {path} is not valid JSON") from None


class ImmichConfigSource:
    def __init__(self, settings: ImmichSettings, database: SearchDatabase) -> None:
        self.settings = settings
        self.database = database
        self._cached: tuple[float, MlConfig] | None = None
        self._lock = asyncio.Lock()

    async def get(self, *, fresh: bool = False) -> MlConfig:
        """The effective settings; ``fresh`` bypasses the cache (to notice a model change during a regenerate).
        Raises DatabaseUnavailable or ConfigFileError when the source cannot be read."""
        now = time.monotonic()
        if not fresh and self._cached is not None and self._cached[0] > now:
            return self._cached[1]
        async with self._lock:
            if not fresh and self._cached is not None and self._cached[0] > time.monotonic():
                return self._cached[1]
            if self.settings.config_file is not None:
                config = parse_ml_config(await asyncio.to_thread(_read_file, self.settings.config_file), "file")
            else:
                config = parse_ml_config(await self.database.stored_config(), "database")
            self._cached = (time.monotonic() + self.settings.config_ttl_s, config)
            return config
