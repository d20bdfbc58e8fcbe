"""Key holders: the PKCS#11 token, the IC card and (for tests) memory, behind one interface."""

from .base import KEY_INDEXES, KeyHolder, RecordKey

__all__ = ["KEY_INDEXES", "KeyHolder", "RecordKey"]
