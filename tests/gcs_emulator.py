"""A local Google Cloud Storage for tests: ``python tests/gcs_emulator.py PORT BUCKET``.

gcp-storage-emulator's JSON API, plus what real GCS does and the emulator lacks: downloads carry
``x-goog-generation`` and writes and deletes honour ``ifGenerationMatch`` (412 when it does not
hold), which tensorstore's OCDBT (Orbax's format) relies on, and objects can be moved (``moveTo``,
gcsfs's rename). Clients reach it through :func:`env` (tensorstore, gcsfs and google-cloud-storage,
array_record's C++ client).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
from http import HTTPStatus

ENV_TEMPLATE = {
    "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:{port}",     # tensorstore (Orbax's arrays)
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:{port}",        # gcsfs (etils.epath), google-cloud-storage
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": "http://127.0.0.1:{port}",  # array_record's reader
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-type lookups through the control API
}


def env(port: int) -> dict:
    return {k: v.format(port=port) for k, v in ENV_TEMPLATE.items()}


def _generation(storage, request):
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])["generation"]
    except (NotFound, KeyError):
        return None


def _precondition_fails(storage, request, object_id=None) -> bool:
    wanted = request.query.get("ifGenerationMatch")
    if not wanted:
        return False
    if object_id is not None:
        request.params["object_id"] = object_id
    have = _generation(storage, request)
    return (have is None) != (wanted[0] == "0") or (have is not None and have != wanted[0])


def _with_generation(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT) and (
                handler.__name__ == "download" or request.query.get("alt") == ["media"]):
            generation = _generation(storage, request)
            if generation is not None:
                response["x-goog-generation"] = generation
                response["x-goog-metageneration"] = "1"
    return wrapped


def _conditional(handler, object_id_of):
    def wrapped(request, response, storage, *args, **kwargs):
        if _precondition_fails(storage, request, object_id_of(request)):
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "Precondition Failed"}})
            return
        handler(request, response, storage, *args, **kwargs)
    return wrapped


def _move(request, response, storage, *args, **kwargs):
    """``POST .../o/{src}/moveTo/o/{dst}`` (gcsfs renames with it): copy, then delete the source."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    bucket, source, target = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, target)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    objects._delete(storage, bucket, source)
    response.json(moved)


def patch_handlers() -> None:
    from gcp_storage_emulator import server, settings
    from gcp_storage_emulator.handlers import objects

    def upload_name(request):  # a media upload names the object in the query, a multipart one in its body
        name = request.query.get("name")
        if name:
            return name[0]
        return (request.data.get("meta") or {}).get("name") if isinstance(request.data, dict) else None

    replacements = {
        objects.download: _with_generation(objects.download),
        objects.get: _with_generation(objects.get),
        objects.insert: _conditional(objects.insert, upload_name),
        objects.delete: _conditional(objects.delete, lambda request: None),
    }
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            handlers[method] = replacements.get(handler, handler)
    objects.download = replacements[objects.download]  # objects.get(alt=media) calls it by name
    move = (rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
            r"(?P<dest_object_id>.*[^/]+)$", {"POST": _move})
    server.HANDLERS = (move, *server.HANDLERS)


@contextlib.contextmanager
def running(log_dir, bucket: str):
    """``gs://<bucket>`` served by this module in a subprocess on a free port, with the clients' endpoint
    variables pointing at it while the block runs (restored after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = pathlib.Path(log_dir) / "emulator.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, str(port), bucket], stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT)
    for _ in range(300):
        if proc.poll() is not None or log.read_text().startswith("ready"):
            break
        time.sleep(0.05)
    assert log.read_text().startswith("ready"), log.read_text()
    saved = {k: os.environ.get(k) for k in ENV_TEMPLATE}
    os.environ.update(env(port))
    try:
        yield f"gs://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.stdin.close()
        proc.wait(timeout=10)


def main(port: int, bucket: str) -> None:
    import logging

    from gcp_storage_emulator.server import create_server

    logging.disable(logging.WARNING)
    patch_handlers()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()  # runs until the parent closes our stdin (or dies)
    finally:
        server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
