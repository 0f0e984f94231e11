"""The S3 client and what counts as a transient S3 failure.

In: an endpoint URL (or AWS_ENDPOINT_URL: MinIO in a stock Kubeflow, moto in
tests), retry and timeout settings. Out: a boto3 client with adaptive retries;
the botocore exceptions that a retry or a resume may cure.
"""

from __future__ import annotations

import os
from typing import Any

# Attempts per request (the first plus 3 retries).
RETRIES = 4
CONNECT_TIMEOUT_S = 10.0
# Seconds without a single byte before a read is abandoned (and resumed).
READ_TIMEOUT_S = 60.0


def transient_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures in the middle of a request or a body: worth another try."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    return (BotoConnectionError, ReadTimeoutError, IncompleteReadError, ResponseStreamingError)


def make_client(endpoint_url: str | None = None, *, retries: int = RETRIES, timeout_s: float = READ_TIMEOUT_S) -> Any:
    """A boto3 S3 client: `endpoint_url`, else AWS_ENDPOINT_URL.

    botocore's adaptive retry mode retries throttling, 5xx and connection errors
    with backoff and also slows the client down when the server throttles.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max(1, retries), "mode": "adaptive"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=timeout_s,
    )
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None, config=config)
