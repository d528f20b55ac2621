"""Integrity of a logged agent: what was logged is what gets loaded.

A logged agent is code (MLflow's pyfunc unpickles `python_model.pkl` and imports the logged `code/arft_core`), so
whoever can write to the artifact store could otherwise run code wherever the model is loaded. When the agent is
logged, `record` writes a manifest (the sha256 of every file of the LoggedModel's artifacts) into its artifacts and
the manifest's own digest into the tracking store: a tag of the LoggedModel, copied onto each registered version.
`download_verified` downloads a model, checks the manifest against that tag and every file against the manifest,
before anything of the model is imported or unpickled; a changed, added or missing file is refused by name.

    record(info.model_id)                                   # after log_agent
    folder = download_verified("models:/arft-agent@champion")
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

MANIFEST_FILE = "arft-manifest.json"  # in the model's artifacts, next to MLmodel
DIGEST_TAG = "arft.manifest_sha256"  # LoggedModel and registered-version tag: the manifest's sha256
# Not the model's: MLflow's client writes `registered_model_meta` (name, version) into every models:/ download,
# over whatever the store holds, so it differs per download.
_NOT_CHECKED = {MANIFEST_FILE, "registered_model_meta"}
_CHUNK = 2**20


class IntegrityError(RuntimeError):
    """A model's files differ from what was logged (or cannot be checked)."""


def file_digests(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `folder` but the manifest and MLflow's download note."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if rel in _NOT_CHECKED:
            continue
        if path.is_symlink():  # an artifact store holds files, never links: a link could point anywhere
            raise IntegrityError(f"{rel}: a symbolic link in the model's artifacts")
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digests[rel] = h.hexdigest()
    return digests


def manifest_bytes(folder: Path) -> bytes:
    return (json.dumps({"format": 1, "files": file_digests(folder)}, indent=1, sort_keys=True) + "\n").encode()


def verify(folder: Path, digest: str, what: str) -> None:
    """Raise IntegrityError naming the first file of `folder` that differs from its manifest, or the manifest when
    its sha256 is not `digest` (the tracking store's record). `what` names the model in the message."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise IntegrityError(f"{what}: no {MANIFEST_FILE} in its artifacts (logged without one, or it was removed)")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise IntegrityError(f"{what}: {MANIFEST_FILE} differs from the one logged with the model "
                             f"(sha256 {hashlib.sha256(raw).hexdigest()[:16]}..., tag {DIGEST_TAG} "
                             f"{digest[:16]}...): the artifacts were changed after logging")
    expected = json.loads(raw)["files"]
    found = file_digests(folder)
    for rel in sorted(expected.keys() | found.keys()):
        if rel not in found:
            raise IntegrityError(f"{what}: {rel} is missing from the artifacts (it was logged with the model)")
        if rel not in expected:
            raise IntegrityError(f"{what}: {rel} was added to the artifacts after logging")
        if found[rel] != expected[rel]:
            raise IntegrityError(f"{what}: {rel} was changed after logging (sha256 {found[rel][:16]}..., "
                                 f"logged {expected[rel][:16]}...)")


def record(model_id: str, client=None) -> str:
    """Write the manifest of LoggedModel `model_id`'s artifacts (as stored) into them, tag the LoggedModel with
    its digest and return the digest. Called right after logging, before anyone else knows the model's id."""
    import mlflow

    client = client or mlflow.MlflowClient()
    with tempfile.TemporaryDirectory(prefix="arft-manifest-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=tmp))
        raw = manifest_bytes(folder)
        path = Path(tmp) / MANIFEST_FILE
        path.write_bytes(raw)
        client.log_model_artifact(model_id, str(path))
    digest = hashlib.sha256(raw).hexdigest()
    client.set_logged_model_tags(model_id, {DIGEST_TAG: digest})
    return digest


def pinned(uri: str, client=None) -> tuple[str, str]:
    """(`models:/<name>/<version>` or `models:/<model_id>`, the manifest digest the tracking store records for it)
    for `models:/<name>@<alias>`, `models:/<name>/<version>` or `models:/<model_id>`. An alias is resolved once, so
    the files checked are those of the version whose digest was read."""
    import mlflow

    client = client or mlflow.MlflowClient()
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        mv = client.get_model_version_by_alias(*ref.split("@", 1))
        tags, fixed = mv.tags, f"models:/{mv.name}/{mv.version}"
    elif "/" in ref:
        tags, fixed = client.get_model_version(*ref.split("/", 1)).tags, uri
    else:
        tags, fixed = client.get_logged_model(ref).tags, uri
    if not tags.get(DIGEST_TAG):
        raise IntegrityError(f"{uri}: no {DIGEST_TAG} tag, so its files cannot be checked (logged by an arft "
                             "without integrity manifests: log and register it again)")
    return fixed, tags[DIGEST_TAG]


def download_verified(uri: str, dst: Path | None = None) -> Path:
    """Download the model `uri` (a `models:/` URI) into `dst` (default: a new temporary folder, the caller's) and
    return its folder once every file is checked against the digest the tracking store records; IntegrityError
    names the file that differs."""
    import mlflow

    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: not a models:/ URI")
    fixed, digest = pinned(uri)
    # Always a private copy: a local artifact store would otherwise hand back its own folder, which could change
    # between the check and the load.
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="arft-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    folder = Path(mlflow.artifacts.download_artifacts(fixed, dst_path=str(dst)))
    verify(folder, digest, uri if fixed == uri else f"{uri} ({fixed})")
    return folder
