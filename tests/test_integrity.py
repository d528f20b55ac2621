"""A registered version is loaded only as it was logged: `log_agent` records a manifest of every artifact file and
its digest as a tag; `download_verified` (behind `arft eval --model models:/...`, the promotion's re-scoring and
`arft serve`) refuses a version whose pickle, weights or code changed in the artifact store, naming the file, before
anything of it is unpickled or imported."""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import write_params
from servers import free_port, model_server, tracking_store

NAME = "arft-agent"


class _Payload:
    """Unpickling this writes a marker file: what a tampered python_model.pkl would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The tiny agent logged and registered (@candidate) in a SQLite store with file artifacts under `root`."""
    from arft_core.config import load_config
    from arft_core.model.embedded import prepare_base_model
    from arft_core.registry import log_agent, register_model

    root = tmp_path_factory.mktemp("integrity")
    cfg = load_config(write_params(root))
    prepare_base_model(cfg.model, root / "model")
    uri = f"sqlite:///{root}/mlflow.db"
    with tracking_store(uri):
        experiment = mlflow.create_experiment("integrity", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_agent(root / "model", cfg)
        register_model(info.model_uri, NAME, "candidate", {})
        yield root, uri, info


def _stored(root: Path, name: str) -> Path:
    """The artifact store's own copy of a model file (file:// artifacts: a plain file under root/artifacts)."""
    (found,) = [p for p in (root / "artifacts").rglob(name) if "arft-manifest" not in str(p)]
    return found


def _flip_byte(path: Path, at: int) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    return data


def test_registration_records_the_manifest_digest_and_an_untampered_version_loads(store, tmp_path):
    from arft_core.integrity import DIGEST_TAG, MANIFEST_FILE, download_verified, file_digests

    root, _, info = store
    version = mlflow.MlflowClient().get_model_version_by_alias(NAME, "candidate")
    assert version.tags[DIGEST_TAG] == mlflow.get_logged_model(info.model_id).tags[DIGEST_TAG]
    folder = download_verified(f"models:/{NAME}@candidate", tmp_path / "dl")
    files = file_digests(folder)
    assert {"MLmodel", "python_model.pkl", "artifacts/model/model.safetensors", "artifacts/serving.json",
            "code/arft_core/registry.py"} <= files.keys() and (folder / MANIFEST_FILE).is_file()
    model = mlflow.pyfunc.load_model(str(folder))  # the verified local copy is what gets loaded
    assert type(model.unwrap_python_model()).__name__ == "AgentModel"


@pytest.mark.parametrize("name, rel", [("python_model.pkl", "python_model.pkl"),
                                       ("model.safetensors", "artifacts/model/model.safetensors")])
def test_one_changed_byte_is_refused_naming_the_file(store, tmp_path, name, rel):
    from arft_core.integrity import IntegrityError, download_verified
    from arft_core.stages.evaluate import registered_model_dir

    root, _, _ = store
    stored = _stored(root, name)
    original = _flip_byte(stored, len(stored.read_bytes()) // 2)
    try:
        with pytest.raises(IntegrityError, match=f"models:/{NAME}@candidate \\(models:/{NAME}/1\\): {rel} was "
                                                 "changed after logging"):
            download_verified(f"models:/{NAME}@candidate", tmp_path / "dl")
        with pytest.raises(IntegrityError, match=f"{rel} was changed"):  # what `arft eval --model` and re-scoring use
            registered_model_dir(f"models:/{NAME}/1")
    finally:
        stored.write_bytes(original)
    download_verified(f"models:/{NAME}/1", tmp_path / "again")  # restored: loads again


def test_a_malicious_pickle_is_refused_before_it_is_unpickled(store, tmp_path):
    from arft_core.integrity import IntegrityError, download_verified

    root, _, _ = store
    stored, marker = _stored(root, "python_model.pkl"), tmp_path / "pwned"
    original = stored.read_bytes()
    stored.write_bytes(pickle.dumps(_Payload(marker)))
    try:
        with pytest.raises(IntegrityError, match="python_model.pkl was changed after logging"):
            download_verified(f"models:/{NAME}@candidate", tmp_path / "dl")
        assert not marker.exists()
    finally:
        stored.write_bytes(original)


def test_added_or_removed_files_and_a_rewritten_manifest_are_refused(store, tmp_path):
    from arft_core.integrity import MANIFEST_FILE, IntegrityError, download_verified, manifest_bytes

    root, _, _ = store
    code = _stored(root, "registry.py").parent
    extra = code / "sitecustomize.py"
    extra.write_text("print('imported')\n")
    try:
        with pytest.raises(IntegrityError, match="code/arft_core/sitecustomize.py was added to the artifacts"):
            download_verified(f"models:/{NAME}/1", tmp_path / "added")
        # An attacker who also rewrites the manifest to match: its digest is not the one the registry holds.
        manifest = next((root / "artifacts").rglob(MANIFEST_FILE))
        original = manifest.read_bytes()
        manifest.write_bytes(manifest_bytes(manifest.parent))
        try:
            with pytest.raises(IntegrityError, match=f"{MANIFEST_FILE} differs from the one logged with the model"):
                download_verified(f"models:/{NAME}/1", tmp_path / "rewritten")
        finally:
            manifest.write_bytes(original)
    finally:
        extra.unlink()
    serving = _stored(root, "serving.json")
    moved = serving.with_name("serving.json.bak")
    shutil.move(serving, moved)
    try:
        with pytest.raises(IntegrityError, match="artifacts/serving.json is missing from the artifacts"):
            download_verified(f"models:/{NAME}/1", tmp_path / "removed")
    finally:
        shutil.move(moved, serving)


def test_a_version_without_a_digest_cannot_be_loaded_or_registered(store, tmp_path):
    from arft_core.integrity import DIGEST_TAG, IntegrityError, download_verified
    from arft_core.registry import register_model

    _, _, info = store
    client = mlflow.MlflowClient()
    digest = client.get_model_version(NAME, "1").tags[DIGEST_TAG]
    client.delete_logged_model_tag(info.model_id, DIGEST_TAG)
    client.delete_model_version_tag(NAME, "1", DIGEST_TAG)
    try:
        with pytest.raises(IntegrityError, match=f"models:/{info.model_id}: no {DIGEST_TAG} tag"):
            register_model(info.model_uri, NAME, "candidate", {})
        with pytest.raises(IntegrityError, match=f"models:/{NAME}/1: no {DIGEST_TAG} tag"):
            download_verified(f"models:/{NAME}/1", tmp_path / "dl")
    finally:
        client.set_logged_model_tags(info.model_id, {DIGEST_TAG: digest})
        client.set_model_version_tag(NAME, "1", DIGEST_TAG, digest)


def test_arft_serve_refuses_a_tampered_version_and_serves_a_checked_copy(store, tmp_path):
    """`arft serve`: a changed weight file is one error line naming it, nothing served; the untouched version
    answers /ping, and SIGTERM ends the server and removes the checked copy."""
    import os
    import signal
    import subprocess

    root, uri, _ = store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TMPDIR": str(tmp_path)}
    arft = [str(Path(sys.executable).parent / "arft"), "serve", f"models:/{NAME}@candidate",
            "--params", str(root / "params.yaml")]
    stored = _stored(root, "model.safetensors")
    original = _flip_byte(stored, 100)
    try:
        proc = subprocess.run([*arft, "--port", str(free_port())], env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        stored.write_bytes(original)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: models:/arft-agent@candidate (models:/arft-agent/1): artifacts/model/model.safetensors was " \
           "changed after logging" in " ".join(proc.stderr.split())
    assert not list(tmp_path.glob("arft-serve-*"))

    port = free_port()
    server = model_server([*arft, "--port", str(port)], env, port, tmp_path / "serve.log")
    try:
        assert len(list(tmp_path.glob("arft-serve-*"))) == 1  # the checked copy being served
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)  # TimeoutExpired: SIGTERM did not end it
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert not list(tmp_path.glob("arft-serve-*")), "the checked copy outlived the server"


def test_searching_a_version_in_place_leaves_its_files_as_logged(store, tmp_path):
    """A local artifact store hands MLflow's loader the stored folder itself; the shipped search index, opened and
    searched there, adds no file (tantivy's lock files travel with it)."""
    from arft_core.integrity import download_verified
    from arft_core.search.local import LocalSearch

    root, _, _ = store
    index = _stored(root, "meta.json").parent
    assert index.name == "index" and LocalSearch(index).search("tower", 2)
    download_verified(f"models:/{NAME}/1", tmp_path / "dl")
