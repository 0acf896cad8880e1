"""Where the stack's servers are (URLs as seen from this machine) and the client settings they need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .common import S3_ACCESS_KEY, S3_SECRET_KEY


@dataclass
class StackInfo:
    """Where everything is (URLs as seen from this machine)."""

    workdir: Path
    postgres_port: int = 0
    s3_url: str = ""
    prefect_api_url: str = ""
    prefect_auth_string: str = ""
    mlflow_url: str = ""
    pool: str = ""
    storage: str = ""
    worker_pd_home: Path | None = None

    def s3_env(self) -> dict[str, str]:
        """Client settings for the moto S3 API (boto3, s3fs and MLflow all read these)."""
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            # AWS_EC2_METADATA_DISABLED: no credential lookups against 169.254.169.254.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def prefect_client_env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.prefect_api_url, "PREFECT_API_AUTH_STRING": self.prefect_auth_string}
