"""Runs the image's Patroni (Debian 12's 3.0.2, under /usr/bin/python3) with one fix from
upstream Patroni 3.0.3: the node writes this file's text next to Patroni's config and runs it
instead of `patroni` (`service.patroni_command`). It imports nothing of flynn-host: it runs on
the system's Python, where only Patroni's own modules are.

The fix. Patroni 3.0.2 renews its leader key in etcd (v3) from its *cached* view of the
cluster, and when its lease has lapsed it writes the key back with an unconditional put. A
primary cut off by a partition keeps believing it leads (its cache is frozen); when the
network heals, its put overwrites the key of the primary elected meanwhile, it promotes itself
again with its older data, and the other primary steps down: every write acknowledged during
the partition is gone. The partition test (`test_appliance_ha.py`) caught exactly that. Patroni
3.0.3 and later renew the key only if it still holds this node's name, or create it only where
there is none, in one etcd transaction; `_update_leader` below does the same with 3.0.2's
client. Patroni 4 would have the fix built in, but it refuses a `ttl` under 20 s, which would
double the fail-over time the issue measured (ttl 10 s).
"""

from __future__ import annotations

import sys
import time


def _patch(etcd3: object) -> None:
    cls = etcd3.Etcd3  # type: ignore[attr-defined]
    Leader = etcd3.Leader  # type: ignore[attr-defined]  # noqa: N806 - Patroni's name
    Etcd3Error = etcd3.Etcd3Error  # type: ignore[attr-defined]  # noqa: N806
    ReturnFalseException = etcd3.ReturnFalseException  # type: ignore[attr-defined]  # noqa: N806
    encode = etcd3.base64_encode  # type: ignore[attr-defined]

    def _update_leader(self):  # type: ignore[no-untyped-def]
        retry = self._retry.copy()

        def _retry(*args, **kwargs):  # type: ignore[no-untyped-def]
            kwargs["retry"] = retry
            return retry(*args, **kwargs)

        self._run_and_handle_exceptions(self._do_refresh_lease, True, retry=_retry)
        if not self._lease:
            return False
        cluster = self.cluster
        leader_lease = cluster and isinstance(cluster.leader, Leader) and cluster.leader.session
        if leader_lease == self._lease:
            return True
        retry.deadline = retry.stoptime - time.time()
        if retry.deadline < 1:
            raise Etcd3Error("update_leader timeout")
        key = encode(self.leader_path)
        put = {"request_put": {"key": key, "value": encode(self._name), "lease": self._lease}}
        still_mine = {"key": key, "target": "VALUE", "value": encode(self._name)}
        nobodys = {"key": key, "target": "CREATE", "create_revision": "0"}
        fields = {
            "compare": [still_mine],
            "success": [put],
            "failure": [{"request_txn": {"compare": [nobodys], "success": [put]}}],
        }
        try:
            ret = self._run_and_handle_exceptions(
                self._client.call_rpc, "/kv/txn", fields, retry=_retry
            )
        except ReturnFalseException:
            return False
        nested = (ret.get("responses") or [{}])[0].get("response_txn") or {}
        return bool(ret.get("succeeded") or nested.get("succeeded"))

    # as 3.0.2's own: a ReturnFalseException (etcd unreachable) means False
    cls._update_leader = etcd3.catch_return_false_exception(_update_leader)  # type: ignore[attr-defined]


def main() -> None:
    from patroni.dcs import etcd3
    from patroni.version import __version__

    version = tuple(int(p) for p in __version__.split(".")[:3] if p.isdigit())
    if version < (3, 0, 3):
        _patch(etcd3)
    from patroni.__main__ import main as patroni_main

    sys.argv = ["patroni", *sys.argv[1:]]
    patroni_main()


if __name__ == "__main__":
    main()
