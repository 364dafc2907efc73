"""A Hugging Face cache laid out as the hub client writes one, so weight loading is tested offline."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cached_snapshot(cache: Path, repo: str) -> Path:
    """The empty snapshot folder of ``repo`` (ORG/NAME) in the cache rooted at ``cache``, made its ``main``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return snapshot


def use_offline_cache(monkeypatch, cache: Path) -> None:
    """What HF_HUB_CACHE=cache and HF_HUB_OFFLINE=1 do when set before huggingface_hub is imported."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
