#!/bin/sh
# One-shot job of the compose stack: create the buckets (idempotent). Also proves that the S3
# credentials in .env work before MLflow and the worker start.
set -eu
endpoint="${S3_ENDPOINT_URL:?S3_ENDPOINT_URL is not set}"
for bucket in ${S3_BUCKETS:-checkpoints mlflow}; do
    tries=0
    until aws --endpoint-url "$endpoint" s3api head-bucket --bucket "$bucket" >/dev/null 2>&1 \
          || aws --endpoint-url "$endpoint" s3api create-bucket --bucket "$bucket" >/dev/null; do
        tries=$((tries + 1))
        if [ "$tries" -ge 20 ]; then
            echo "create-buckets: cannot create bucket $bucket at $endpoint" >&2
            exit 1
        fi
        sleep 3
    done
    echo "create-buckets: bucket $bucket ready"
done
