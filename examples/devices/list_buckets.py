"""Call a Google API from a device with nothing but its PKI certificate.

Either way works with the unmodified google-auth library:

  # a) executable-sourced credentials (the library runs `token-broker token`)
  export GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1
  export GOOGLE_APPLICATION_CREDENTIALS=examples/devices/credential-config.json

  # b) the local metadata agent (`token-broker agent --listen 127.0.0.1:8080 ...`)
  export GCE_METADATA_HOST=127.0.0.1:8080 GCE_METADATA_IP=127.0.0.1:8080

  pip install google-auth requests
  python3 examples/devices/list_buckets.py my-project https://my-service-abc.a.run.app
"""

import sys

import google.auth
import google.auth.transport.requests
import google.oauth2.id_token
from google.auth.transport.requests import AuthorizedSession


def main() -> None:
    project, run_url = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    credentials, _ = google.auth.default(
        scopes=["https://www.googleapis.com/auth/cloud-platform"]
    )
    session = AuthorizedSession(credentials)
    buckets = session.get(
        "https://storage.googleapis.com/storage/v1/b", params={"project": project}
    )
    buckets.raise_for_status()
    for bucket in buckets.json().get("items", []):
        print(bucket["name"])

    if run_url:
        # A Google-signed ID token for a Cloud Run service (agent path, or a key-less
        # service account impersonation through the broker's google-id-token flow).
        request = google.auth.transport.requests.Request()
        token = google.oauth2.id_token.fetch_id_token(request, run_url)
        answer = session.get(run_url, headers={"Authorization": f"Bearer {token}"})
        print(run_url, answer.status_code)


if __name__ == "__main__":
    main()
