#!/bin/sh
# Start SeaweedFS all-in-one with one S3 identity taken from the environment (.env): the identity
# file is written to a private temporary file at each start, never stored in the image or repo.
# With an identity file, anonymous S3 requests are refused.
set -eu
: "${S3_ACCESS_KEY:?S3_ACCESS_KEY is not set}"
: "${S3_SECRET_KEY:?S3_SECRET_KEY is not set}"
for value in "$S3_ACCESS_KEY" "$S3_SECRET_KEY"; do
    case "$value" in
        *[!A-Za-z0-9._+/=-]* ) echo "entrypoint: S3 keys must use [A-Za-z0-9._+/=-] only" >&2; exit 1 ;;
    esac
done
umask 077
config="$(mktemp -d)/s3.json"   # a fresh 0700 directory
cat > "$config" <<JSON
{
  "identities": [
    {
      "name": "pd",
      "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
JSON
exec weed server \
    -dir=/data \
    -ip.bind=0.0.0.0 \
    -master.volumeSizeLimitMB="${S3_VOLUME_SIZE_LIMIT_MB:-1024}" \
    -s3 \
    -s3.port=8333 \
    -s3.config="$config"
