"""Model packs: the folders of Hugging Face checkpoints a Squint deployment serves.

A pack is a directory with a manifest, ``squint-pack.json``, naming
- ``clip``: a CLIP checkpoint (``CLIPModel``: vision and text towers, tokenizer, image processor),
- ``llava``: a LLaVA checkpoint (``LlavaForConditionalGeneration`` + ``AutoProcessor``),
- ``compressors``: optional weights folders by compressor name (STF's fusion and projector),
- ``language_model``: optional, the LLaVA checkpoint's language model alone as a causal-LM
  checkpoint (``LlamaForCausalLM`` + tokenizer), the folder vLLM loads (``squint_llm``).
  ``squint pack tiny`` and ``squint pack import`` write it; it is derived from ``llava``, so it
  is not part of the id.

Paths are relative to the pack directory or absolute, so a manifest can point at real
checkpoints elsewhere on disk (``squint pack import``). The ``id`` identifies the weights in
cache keys; it is a content hash computed when the manifest is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

MANIFEST_NAME = "squint-pack.json"
MANIFEST_FORMAT = "squint-pack/1"


class PackError(ValueError):
    """A pack folder is missing, incomplete or inconsistent; the message says what to fix."""


@dataclass(frozen=True)
class ModelPack:
    """A resolved pack: absolute folders and the id that keys caches."""

    root: Path
    id: str
    clip_dir: Path
    llava_dir: Path
    compressor_dirs: dict[str, Path] = field(default_factory=dict)
    name: str = ""
    language_model_dir: Path | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def require_language_model(self) -> Path:
        """The folder vLLM loads, or a :class:`PackError` saying how to write it."""
        if self.language_model_dir is None:
            raise PackError(
                f"pack {self.root} has no language_model folder, which the vLLM engine loads; "
                f"write it with `squint pack language-model {self.root}`"
            )
        return self.language_model_dir


def _resolve(root: Path, value: str, what: str) -> Path:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else (root / path)
    if not path.is_dir():
        raise PackError(f"pack {root}: {what} folder {path} does not exist (set it in {MANIFEST_NAME})")
    return path.resolve()


def load_pack(root: Path | str) -> ModelPack:
    """Read and check a pack's manifest. Raises :class:`PackError` naming what is wrong."""
    root = Path(root).expanduser().resolve()
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackError(
            f"{root} is not a model pack: {MANIFEST_NAME} is missing "
            f"(write one with `squint pack tiny {root}` or `squint pack import {root} --clip ... --llava ...`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise PackError(f"{manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise PackError(f"{manifest_path}: format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}")
    for key in ("id", "clip", "llava"):
        if not manifest.get(key):
            raise PackError(f"{manifest_path}: the field {key!r} is missing")
    pack = ModelPack(
        root=root,
        id=str(manifest["id"]),
        name=str(manifest.get("name", "")),
        clip_dir=_resolve(root, manifest["clip"], "clip"),
        llava_dir=_resolve(root, manifest["llava"], "llava"),
        compressor_dirs={
            name: _resolve(root, rel, f"compressors.{name}") for name, rel in manifest.get("compressors", {}).items()
        },
        language_model_dir=_resolve(root, manifest["language_model"], "language_model")
        if manifest.get("language_model")
        else None,
    )
    for folder, required in ((pack.clip_dir, "config.json"), (pack.llava_dir, "config.json")):
        if not (folder / required).is_file():
            raise PackError(f"pack {root}: {folder} has no {required}; is it a Hugging Face checkpoint folder?")
    return pack


@contextlib.contextmanager
def reading(pack: ModelPack, what: str) -> Iterator[None]:
    """Load ``what`` from ``pack``'s files in the block: a file that is missing or corrupt (the
    loader's ``OSError``, ``ValueError`` or ``SafetensorError``) becomes a :class:`PackError`
    naming the pack, the one-line reason a server that refuses to start gives."""
    try:
        yield
    except PackError:
        raise
    except (OSError, ValueError, SafetensorError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PackError(f"pack {pack.root}: cannot load {what}: {reason}") from exc


def content_id(folders: list[Path], prefix: str) -> str:
    """A short hash of every file's path and bytes under ``folders``: the pack's identity."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder.parent)).encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return f"{prefix}-{digest.hexdigest()[:16]}"


def write_manifest(
    root: Path,
    clip: Path | str,
    llava: Path | str,
    name: str,
    compressors: dict[str, str] | None = None,
    pack_id: str | None = None,
    created_by: str = "",
    language_model: Path | str | None = None,
) -> ModelPack:
    """Write ``squint-pack.json`` into ``root``; the id is a content hash unless given."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    resolved = [_resolve(root, str(clip), "clip"), _resolve(root, str(llava), "llava")]
    # Compressor folders (STF weights, DFMR calibration) change outputs too: they are part of the id.
    resolved += [_resolve(root, rel, f"compressors.{name}") for name, rel in sorted((compressors or {}).items())]
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": pack_id or content_id(resolved, name or "pack"),
        "name": name,
        "clip": str(clip),
        "llava": str(llava),
        "compressors": dict(compressors or {}),
        "created_by": created_by,
    }
    if language_model is not None:
        _resolve(root, str(language_model), "language_model")
        manifest["language_model"] = str(language_model)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return load_pack(root)


def update_manifest(root: Path, **changes: Any) -> ModelPack:
    """Rewrite ``root``'s manifest with ``changes`` (any :func:`write_manifest` argument), every
    other field as it was; the id is the new content's hash unless ``pack_id`` is among them."""
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    fields = {
        "clip": manifest["clip"],
        "llava": manifest["llava"],
        "name": manifest.get("name", ""),
        "compressors": manifest.get("compressors") or {},
        "created_by": manifest.get("created_by", ""),
        "language_model": manifest.get("language_model"),
    }
    return write_manifest(root, **{**fields, **changes})
