"""`pathways worker`, `pathways controller` and `pathways up`: the commands that run servers."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from proto.config import ClusterConfig
from runtime.cli.common import (WORKER_SWITCH_INTERVAL_S, cli_credentials, quiet_collector,
                                start_metrics, stop_on_signal, wait_for_signal)


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    from runtime.cluster.process import die_with_parent

    if args.platform == "sim":  # simulated hosts of whole islands, one event loop
        from runtime.sim import run_worker

        return run_worker(args, cli_credentials(args, args.controller), quiet_collector)
    if not die_with_parent():
        return 1  # the process that started this worker is gone already
    from proto.errors import FailedPreconditionError
    from runtime.server import Worker, create_worker_server, worker_options
    from runtime.worker.distributed import host_devices
    from runtime.worker.membership import Membership

    # The executor thread gives the GIL up while a computation runs; it must get it back within
    # tens of microseconds, not the default 5 ms, when another thread (a Dispatch batch) holds it.
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
    distributed = args.num_hosts > 1
    if distributed and not args.coordinator:
        print("error: --num-hosts > 1 needs --coordinator", file=sys.stderr)
        return 2
    try:
        devices, hosts = host_devices(args.platform, args.devices, args.num_hosts, args.host,
                                      args.coordinator)
    except FailedPreconditionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # After the distributed runtime, which takes SIGTERM over: until the worker has registered,
    # a signal ends it at once (registration retries for a minute and would not notice).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os._exit(0))
    start_metrics(args, f"worker {args.island}.{args.host}")
    config = ClusterConfig.from_env().replace(execution_deadline_s=args.execution_deadline)
    worker = Worker(args.island, args.host, devices, platform=args.platform,
                    island_devices=hosts, credentials=cli_credentials(args, args.controller),
                    **worker_options(config))
    server, _ = create_worker_server(worker, f"{args.bind}:{args.port}")
    # Registers now, and again whenever the controller restarts (runtime.worker.membership).
    membership = Membership(args.controller, worker.info, lambda: worker.last_contact,
                            worker.credentials, report=worker.report_soon)
    try:
        membership.start(timeout=args.register_timeout)
    except Exception as exc:
        print(f"error: cannot register with controller {args.controller}: {exc}", file=sys.stderr)
        server.stop(grace=None)
        return 1
    stop = stop_on_signal()  # from now on a signal stops the worker in order
    quiet_collector()
    print(f"worker {args.island}.{args.host} listening on {worker.address} "
          f"({args.devices} {args.platform} devices"
          f"{f', host {args.host} of {args.num_hosts}' if distributed else ''})", flush=True)
    wait_for_signal(stop)
    membership.stop()
    server.stop(grace=1.0)
    worker.stop()
    if distributed or worker.hang:
        # Skip interpreter teardown: the distributed runtime's shutdown waits for hosts that may be
        # gone, and a computation stuck in a collective never returns.
        logging.shutdown()
        os._exit(0)
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    from runtime.cluster.process import die_with_parent
    from runtime.server import Controller, controller_options, create_controller_server

    if not die_with_parent():  # started by a cluster (runtime.sim) that is gone already
        return 1

    credentials = cli_credentials(args)
    if credentials.token is None:
        print("warning: no token (--token-file, $PATHWAYS_TOKEN): calls are not authenticated",
              file=sys.stderr)
    config = _config(args)
    sys.setswitchinterval(config.controller.controller_switch_interval_s)
    controller = Controller(credentials=credentials, **controller_options(config))
    server, port = create_controller_server(controller, f"{args.bind}:{args.port}")
    start_metrics(args, "controller")
    quiet_collector()
    print(f"controller listening on {args.bind}:{port} (policy {args.policy})", flush=True)
    wait_for_signal()
    controller.close()
    server.stop(grace=1.0)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from proto import auth as _auth

    devices_per_host = args.devices_per_host or max(1, args.devices_per_island // args.hosts_per_island)
    start_metrics(args, "controller")  # first: a port in use stops everything before it starts
    config = _config(args)
    sys.setswitchinterval(config.controller.controller_switch_interval_s)  # it holds one
    if args.platform == "sim":
        from runtime.sim import SimCluster

        if args.ray is not None or args.tls_cert:
            print("error: --platform sim runs its own simulated processes, without --ray or "
                  "--tls-cert", file=sys.stderr)
            return 2
        fixed = args.fixed_duration_ms
        cluster = SimCluster(args.islands, args.hosts_per_island, devices_per_host,
                             processes=args.sim_processes or None, flops_per_s=args.flops_per_s,
                             fixed_duration_s=None if fixed is None else fixed / 1e3,
                             port=args.port, host=args.bind, config=config)
        backend = (f"simulated hosts in {len(cluster.procs)} processes (registered in "
                   f"{cluster.registration_s:.1f} s)")
    elif args.ray is None:
        from runtime.cluster.process import ProcessCluster

        tls = None
        if args.tls_cert:
            tls = _auth.TLSConfig(ca=args.tls_ca or "", cert=args.tls_cert, key=args.tls_key or "")
        cluster = ProcessCluster(args.islands, args.hosts_per_island, devices_per_host,
                                 port=args.port, host=args.bind, platform=args.platform,
                                 credentials=_auth.Credentials.generate(tls), config=config,
                                 worker_metrics_port=(None if args.metrics_port is None else
                                                      args.metrics_port and args.metrics_port + 1))
        backend = "local processes"
    else:
        from runtime.cluster.ray_cluster import RayCluster

        if args.tls_cert:
            print("error: --tls-cert is not supported with --ray (the certificate files would "
                  "have to be on every Ray node)", file=sys.stderr)
            return 2
        cluster = RayCluster(args.islands, args.hosts_per_island, devices_per_host,
                             ray_address=args.ray or None,
                             placement_strategy=args.placement_strategy, port=args.port,
                             host=args.bind, platform=args.platform,
                             max_host_restarts=args.max_host_restarts,
                             credentials=_auth.Credentials.generate(), config=config)
        backend = (f"Ray actors ({cluster.placement_strategy}, "
                   f"{'local Ray instance' if not args.ray else 'Ray at ' + args.ray})")
    # The clients' token, readable by this user only (the cluster published it for this
    # machine's clients); the host token stays with the workers.
    token_file = cluster.token_file
    if args.token_file:
        _auth.write_token_file(args.token_file, cluster.credentials.token)
        token_file = args.token_file
    quiet_collector()
    proxy = proxy_token = None
    try:
        print(f"{args.islands} islands x {args.hosts_per_island} hosts x {devices_per_host} "
              f"{args.platform} devices up as {backend}", flush=True)
        print(f"controller listening on {cluster.address}", flush=True)
        if args.metrics_port and args.ray is None:
            hosts = args.islands * args.hosts_per_island
            print(f"host metrics on ports {args.metrics_port + 1}-{args.metrics_port + hosts} "
                  f"(island by island)", flush=True)
        if token_file:
            print(f"token in {token_file} (clients on this machine find it; elsewhere set "
                  f"{_auth.TOKEN_FILE_ENV})", flush=True)
        if args.proxy_port is not None:
            from runtime.cli.proxy import ProxyProcess
            from runtime.cluster.hosts import publish_token

            proxy = ProxyProcess(cluster.address, f"{args.bind}:{args.proxy_port}",
                                 cluster.credentials)
            proxy_token = publish_token(proxy.address, cluster.credentials)
            print(f"IFRT proxy (plain JAX: runtime.proxy.connect) listening on {proxy.address}",
                  flush=True)
        wait_for_signal()
    finally:
        if proxy is not None:
            from runtime.cluster.hosts import withdraw_token

            proxy.stop()
            withdraw_token(proxy_token, cluster.credentials.token)
        cluster.close()
        if args.token_file:
            from runtime.cluster.hosts import withdraw_token

            withdraw_token(args.token_file, cluster.credentials.token)
    print("stopped", flush=True)
    return 0


def _config(args: argparse.Namespace) -> ClusterConfig:
    """The cluster's settings: the environment's (proto.config), with this command's flags."""
    return ClusterConfig.from_env().replace(
        policy=getattr(args, "policy", None),
        execution_deadline_s=getattr(args, "execution_deadline", None),
        session_quota_bytes=getattr(args, "session_quota", 0) or None,
        session_lease_s=getattr(args, "session_lease", None))
