"""Start one more Ray node on loopback, joined to a head, and keep it up until this process is stopped.

    python tests/ray_node.py --address 127.0.0.1:PORT --temp-dir DIR [--num-cpus 1]

Why not `ray start --address`: in Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which
keeps every server on 127.0.0.1) `ray start` refuses to add a node, and outside that mode Ray swaps
127.0.0.1 for the machine's outward address and binds every interface. Ray's own multi-node test helper
(`ray.cluster_utils.Cluster`) starts extra nodes in-process the same way; this does it with a temp dir
of the node's own and without touching /tmp/ray.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray._private.node  # noqa: E402
import ray._private.parameter  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True, help="the head's GCS address, host:port")
    p.add_argument("--temp-dir", required=True)
    p.add_argument("--num-cpus", type=int, default=1)
    args = p.parse_args()
    params = ray._private.parameter.RayParams(
        gcs_address=args.address,
        node_ip_address="127.0.0.1",
        temp_dir=args.temp_dir,
        num_cpus=args.num_cpus,
        num_gpus=0,
        object_store_memory=200 * 1024 * 1024,
        include_log_monitor=False,
        node_manager_port=0,
        dashboard_agent_listen_port=None,
        min_worker_port=0,
        max_worker_port=0,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
    print(f"node {node.node_id} up", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
