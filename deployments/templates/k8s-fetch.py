"""canaryflow init container: fetch a model archive from the MLflow artifact store and check its sha256 before
TorchServe starts. A mismatch (or any failure) exits non-zero: the pod never starts TorchServe on that archive.

Environment: ARCHIVE_URL (http or https), ARCHIVE_SHA256 (hex), ARCHIVE_PATH (where the .mar goes); optional
MLflow credentials from a Secret, the names MLflow's own clients use: MLFLOW_TRACKING_TOKEN, or
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD. Standard library only.
"""

import base64
import hashlib
import os
import sys
import urllib.parse
import urllib.request


def request(url: str) -> urllib.request.Request:
    req = urllib.request.Request(url)
    token, user = os.environ.get("MLFLOW_TRACKING_TOKEN"), os.environ.get("MLFLOW_TRACKING_USERNAME")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    elif user:
        pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        req.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    return req


def main() -> int:
    url, want, dest = os.environ["ARCHIVE_URL"], os.environ["ARCHIVE_SHA256"].lower(), os.environ["ARCHIVE_PATH"]
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        print(f"fetch: {url!r} is not an http(s) URL; refusing", file=sys.stderr)
        return 2
    part, digest, size = dest + ".part", hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request(url), timeout=60) as resp, open(part, "wb") as out:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except OSError as exc:
        print(f"fetch: could not download {url}: {exc}", file=sys.stderr)
        return 3
    got = digest.hexdigest()
    if got != want:
        os.unlink(part)
        print(f"fetch: sha256 mismatch for {url}: got {got}, the release recorded {want}; not serving it",
              file=sys.stderr)
        return 1
    os.replace(part, dest)
    print(f"fetch: {dest} ({size} bytes, sha256 {got}) ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
