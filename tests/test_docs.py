"""The README's configuration tables are generated from the settings classes and must not drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_settings_tables_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/settings_doc.py", "--check", "README.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_every_setting_is_documented() -> None:
    from ai_service.settings import AIServiceSettings
    from db.settings import DbSearchSettings
    from gateway.settings import GatewaySettings
    from library.settings import LibrarySettings

    def walk(model: type, path: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{path}.{name}")
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                missing += walk(annotation, f"{path}.{name}")
        return missing

    missing = (
        walk(AIServiceSettings, "ai_service")
        + walk(GatewaySettings, "gateway")
        + walk(DbSearchSettings, "db")
        + walk(LibrarySettings, "library")
    )
    assert not missing, f"settings without a description: {missing}"
