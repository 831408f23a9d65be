"""GCS emulators: talk to them anonymously, without a credential search.

With STORAGE_EMULATOR_HOST set (gcp-storage-emulator, fake-gcs-server, ...)
google-cloud-storage sends every request there, and an emulator needs no
credentials. Beam still searches for Application Default Credentials before
its first gs:// access in each process: google.auth.default(), which probes
the GCE metadata server (169.254.169.254), retried with backoff, about 25 s
with nothing found, after which Beam connects anonymously anyway.

`use_anonymous_gcs_if_emulated` records "anonymous" in Beam's per-process
credentials cache up front, so no lookup happens. It is called by the command
line (the launcher) and when the `transforms` package is imported (every
worker process, before its first bundle). Without STORAGE_EMULATOR_HOST it
does nothing: real GCS keeps Beam's usual credentials.
"""
from __future__ import annotations

import logging
import os

LOG = logging.getLogger(__name__)
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def use_anonymous_gcs_if_emulated() -> bool:
    """True where GCS is an emulator and Beam was told to go anonymous."""
    if not os.environ.get(EMULATOR_ENV):
        return False
    try:
        from apache_beam.internal.gcp import auth
        credentials = auth._Credentials  # pylint: disable=protected-access
        with credentials._credentials_lock:  # pylint: disable=protected-access
            credentials._credentials = None  # None: Beam's anonymous client
            credentials._credentials_init = True
    except (ImportError, AttributeError):  # another Beam: it searches itself
        LOG.warning("%s is set but this Beam's credential cache is unknown: "
                    "Beam may look for credentials first", EMULATOR_ENV)
        return False
    return True
