"""Where a model's SavedModel folders come from: TF-Hub (through
tensorflow_hub's cache), a folder, or a gs:// copy cached on disk."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid

from transforms.model import catalog
from transforms.model.cache import cache_root, first_line
from transforms.model.spec import ModelSpec, ModelUnavailableError

LOG = logging.getLogger(__name__)


def resolve_model(spec: ModelSpec) -> list[str]:
    """The local SavedModel folders of `spec` (none for random weights):
    fetched through TF-Hub's cache or copied from gs:// where needed."""
    if spec.source == "random":
        return []
    if spec.source == "tfhub":
        return [resolve_hub(h, spec) for h in spec.hub_handles()]
    return resolve_saved_model(spec)


def offline_help(spec: ModelSpec) -> str:
    variant = catalog.get_variant(spec.variant)
    return (
        "To run without access to TF-Hub, download the module where you have "
        f"internet ({variant.hub_handle('classification', 3)}"
        "?tf-hub-format=compressed is a .tar.gz), unpack it and pass "
        "--model_handle /path/to/dir (or gs://bucket/dir); or point "
        "TFHUB_CACHE_DIR at a cache that already holds it; or pass "
        "--model_source random for a smoke run with random weights.")


def resolve_hub(handle: str, spec: ModelSpec) -> str:
    import tensorflow_hub as hub
    try:
        return hub.resolve(handle)
    except Exception as e:
        cache = os.environ.get("TFHUB_CACHE_DIR") or "(default temp cache)"
        raise ModelUnavailableError(
            f"could not fetch {handle} from TF-Hub "
            f"({type(e).__name__}: {first_line(e)}); TFHUB_CACHE_DIR="
            f"{cache}. {offline_help(spec)}") from e


def resolve_saved_model(spec: ModelSpec) -> list[str]:
    if spec.handle.startswith(("http://", "https://")):
        # A handle URL: let tensorflow_hub fetch and cache it.
        return [resolve_hub(h, spec) for h in spec.hub_handles()]
    paths = [local_copy(spec.handle, spec)]
    if spec.feature_handle:
        paths.append(local_copy(spec.feature_handle, spec))
        return paths
    root = paths[0]
    if os.path.exists(os.path.join(root, "saved_model.pb")):
        return paths
    heads = [os.path.join(root, h) for h in ("classification", "feature_vector")]
    if all(os.path.exists(os.path.join(h, "saved_model.pb")) for h in heads):
        return heads
    raise ModelUnavailableError(
        f"{spec.handle} is not a SavedModel directory: it has no "
        "saved_model.pb, nor classification/ and feature_vector/ SavedModels "
        f"(it holds: {', '.join(sorted(os.listdir(root))[:10]) or 'nothing'}).")


def local_copy(uri: str, spec: ModelSpec) -> str:
    """A local directory holding the SavedModel at `uri` (copied once if remote)."""
    from apache_beam.io.filesystems import FileSystems

    if "://" not in uri:
        if not os.path.isdir(uri):
            raise ModelUnavailableError(
                f"no SavedModel directory at {uri!r} (it does not exist or is "
                "not a directory).")
        return os.path.abspath(uri)
    base = uri.rstrip("/")
    try:
        matches = FileSystems.match([base + "/**"])[0].metadata_list
    except Exception as e:
        raise ModelUnavailableError(
            f"could not list the SavedModel at {uri} ({type(e).__name__}: "
            f"{first_line(e)}). Check the URI and the credentials of this "
            "machine.") from e
    if not matches:
        raise ModelUnavailableError(f"no files under {uri}: nothing to load.")
    relatives = [m.path[len(base) + 1:] for m in matches]
    if not any(r.count("/") <= 1 and r.rsplit("/", 1)[-1] == "saved_model.pb"
               for r in relatives):
        # Checked before copying: a folder of images given by mistake must
        # fail now, not after being downloaded.
        raise ModelUnavailableError(
            f"{uri} is not a SavedModel directory: it has no saved_model.pb, "
            "nor classification/ and feature_vector/ SavedModels (it holds: "
            f"{', '.join(sorted(relatives)[:10])}).")
    # The cache key includes sizes and times, so a replaced model is re-fetched.
    fingerprint = hashlib.sha256(base.encode())
    for m in sorted(matches, key=lambda m: m.path):
        fingerprint.update(f"{m.path}|{m.size_in_bytes}|{m.last_updated_in_seconds}".encode())
    target = os.path.join(cache_root(), fingerprint.hexdigest()[:32])
    if os.path.isdir(target):
        return target
    staging = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        for m in matches:
            relative = m.path[len(base) + 1:]
            local = os.path.join(staging, *relative.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with FileSystems.open(m.path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelUnavailableError(
            f"could not copy the SavedModel at {uri} ({type(e).__name__}: "
            f"{first_line(e)}).") from e
    LOG.info("copied %s to %s", uri, target)
    return target
