"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1 (a free port,
in a thread of the test process), one bucket, and the standard AWS variables pointing at it
for the test process and every Ray worker it starts afterwards.

    from s3server import s3  # noqa: F401  (in conftest: the session fixture)

    def test_x(s3):
        root = s3.prefix("my-test")       # "s3://distcl-test/my-test-<n>": fresh per call
"""

from __future__ import annotations

import itertools
import logging
import os
from types import SimpleNamespace

import pytest

BUCKET = "distcl-test"


@pytest.fixture(scope="session")
def s3():
    """The server's bucket (``s3.bucket``, ``s3.uri``), ``s3.prefix(name)`` for a fresh key
    prefix, and ``s3.endpoint``. Skips when moto is not installed (``make setup`` installs it)."""
    server_mod = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(env)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    fs = pafs.S3FileSystem(
        endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
        secret_key="testing", region="us-east-1", allow_bucket_creation=True,
    )  # fmt: skip
    fs.create_dir(BUCKET)
    counter = itertools.count()
    try:
        yield SimpleNamespace(
            bucket=BUCKET, uri=f"s3://{BUCKET}", endpoint=endpoint, fs=fs,
            prefix=lambda name: f"s3://{BUCKET}/{name}-{next(counter)}",
        )  # fmt: skip
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
