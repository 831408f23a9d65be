"""The pipeline's stages, one module each: listing, decode, inference, write."""
# Worker processes import this package before their first bundle: against a
# GCS emulator they must not spend ~25 s searching for credentials.
from transforms.gcs_auth import use_anonymous_gcs_if_emulated as _anonymous_gcs

_anonymous_gcs()
