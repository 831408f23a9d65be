"""The one wrapper around Beam's private credential cache: this test fails
when a Beam upgrade moves what `transforms.gcs_auth` writes, instead of the
wrapper silently doing nothing (and every worker then spending ~25 s on a
credential search against an emulator)."""
from __future__ import annotations

import pytest
from apache_beam.internal.gcp import auth
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.gcs_auth import use_anonymous_gcs_if_emulated


@pytest.fixture
def fresh_credentials_cache():
    cache = auth._Credentials  # pylint: disable=protected-access
    saved = (cache._credentials, cache._credentials_init)
    cache._credentials, cache._credentials_init = None, False
    yield cache
    cache._credentials, cache._credentials_init = saved


def test_against_an_emulator_beam_asks_for_no_credentials(
        monkeypatch, fresh_credentials_cache):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    assert use_anonymous_gcs_if_emulated() is True

    def searched(*_):
        raise AssertionError("Beam searched for credentials")

    monkeypatch.setattr(fresh_credentials_cache, "_get_service_credentials",
                        staticmethod(searched))
    # Beam's own entry point (what GcsIO calls) answers from the cache.
    assert auth.get_service_credentials(PipelineOptions()) is None


def test_without_an_emulator_nothing_changes(monkeypatch, fresh_credentials_cache):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert use_anonymous_gcs_if_emulated() is False
    assert fresh_credentials_cache._credentials_init is False
