"""The noticeboard: a small JSON document under a key in the GCS's key-value store, which every process of the
cluster reaches. Training's rank 0 posts its progress there (`clf.progress`), and a Tune trial its workers'
placement group (`clf.ray_train`); the driver reads them. No process of its own: an actor would be one more
process to start and hold for every run.
"""

from __future__ import annotations

import json

from clf import ray_private


class Noticeboard:
    """A JSON document under `key` (Ray's GCS key-value store, a private API: `clf.ray_private`; the store Ray
    itself keeps job and session facts in)."""

    NAMESPACE = "clf"

    def __init__(self, key: str):
        self.key = key.encode()

    def post(self, document: dict) -> None:
        ray_private.kv_put(self.key, json.dumps(document).encode(), self.NAMESPACE)

    def read(self) -> dict | None:
        raw = ray_private.kv_get(self.key, self.NAMESPACE)
        return json.loads(raw) if raw else None

    def remove(self) -> None:
        ray_private.kv_delete(self.key, self.NAMESPACE)

    @classmethod
    def keys(cls, prefix: str) -> list[str]:
        """The keys under `prefix`."""
        return [key.decode() for key in ray_private.kv_keys(prefix, cls.NAMESPACE)]
