"""`pathways bench ...`: the project's benchmarks as subcommands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `bench` and its benchmarks to the `pathways` command."""
    from benchmarks import dispatch, multitenant, scale, transfer, utilization

    bench = sub.add_parser("bench", help="run a benchmark (dispatch, multitenant, ...)",
                           description="Benchmarks; each writes JSON and plots to --out DIR.")
    benches = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    dispatch.add_parser(benches)
    multitenant.add_parser(benches)
    scale.add_parser(benches)
    transfer.add_parser(benches)
    utilization.add_parser(benches)
