"""URIs as the pipeline sees them: local paths or `scheme://...`, and the one
rule for what of them may be shown (credentials never reach a file or a log).
"""
from __future__ import annotations

import os
import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@")
_PARAM = re.compile(r"([?&#;])([^=&#;?]+)=([^&#;]*)")
_SENSITIVE_KEY = re.compile(
    r"token|sig|key|secret|pass|pwd|credential|auth|session|cookie", re.IGNORECASE)
URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def is_local(path: str) -> bool:
    """A path on this machine's filesystem, not a `scheme://` URI."""
    return "://" not in path


def join(folder: str, *names: str) -> str:
    """A path under `folder`: os.path.join locally, '/' for a URI."""
    if is_local(folder):
        return os.path.join(folder, *names)
    return "/".join([folder.rstrip("/"), *names])


def redact(uri: str) -> str:
    """`uri` with user:password@ and secret-looking query values replaced.

    Only URIs with a scheme have a query: a local file may be called
    `a?sig=1.jpg`, and its name is kept as it is (two such files must stay
    two images).
    """
    if not _SCHEME.match(uri):
        return uri
    uri = _USERINFO.sub(r"\1<redacted>@", uri)
    return _PARAM.sub(
        lambda m: f"{m[1]}{m[2]}=<redacted>" if _SENSITIVE_KEY.search(m[2]) else m[0],
        uri)


def redact_text(text: str) -> str:
    """Free text with every URL in it redacted."""
    return URL_IN_TEXT.sub(lambda m: redact(m[0]), text)
