"""Where the served pipeline comes from: a local diffusers directory or a hub id.

The local checks need neither torch nor diffusers, so ``stepdiff serve`` names a missing directory at
once; only a hub id that is not a local path loads diffusers, to download it.
"""

from __future__ import annotations

from pathlib import Path


def local_pipeline(path_or_hub_id: str) -> Path | None:
    """The local diffusers directory ``path_or_hub_id`` names, or None when it is a hub id to download.
    Raises ValueError for an empty name, a directory without ``model_index.json``, and a path that
    does not exist and cannot be a hub id either."""
    if not path_or_hub_id:
        raise ValueError("no pipeline given: pass --pipeline PATH_OR_HUB_ID (or set STEPDIFF_PIPELINE)")
    local = Path(path_or_hub_id).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ValueError(f"{local} is not a diffusers pipeline directory (no model_index.json)")
        return local.resolve()
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path_or_hub_id)
    except HFValidationError:
        raise ValueError(
            f"pipeline {path_or_hub_id!r}: no such directory, and not a hub id ('name' or 'namespace/name')"
        ) from None
    return None


def resolve_pipeline(path_or_hub_id: str) -> Path:
    """A local diffusers directory for ``path_or_hub_id`` (downloads hub ids once, safetensors only)."""
    local = local_pipeline(path_or_hub_id)
    if local is not None:
        return local
    import diffusers

    try:
        return Path(diffusers.DiffusionPipeline.download(path_or_hub_id, use_safetensors=True))
    except Exception as error:  # the hub raises many types; the message is what matters
        raise ValueError(
            f"pipeline {path_or_hub_id!r} is neither a local directory nor a reachable hub id: {error}"
        ) from error
