"""A real S3-compatible server for tests: moto's server mode on a free 127.0.0.1 port, in this process.

    with s3_server() as s3:
        s3.create_bucket("easel-images")
        settings = load_settings(None, storage={"images_url": "s3://easel-images/tests", ...})

Easel talks to it over HTTP with its own client (obstore), as it would to AWS or MinIO; the
environment carries the endpoint and credentials, the standard AWS variables a deployment sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

ACCESS_KEY = "easel-tests"  # moto accepts any credentials; these say where a request came from
SECRET_KEY = "easel-tests-secret"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str

    def client(self) -> Any:
        """boto3 (moto's own dependency), for what a test checks behind Easel's back."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket)
        return sorted(item["Key"] for item in listing.get("Contents", []))


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


def use_s3_environment(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """The standard AWS variables, pointing at `server`, as a deployment would set them."""
    for name, value in {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                        "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
