"""No pickle, cloudpickle or dill on any server path: programs travel as StableHLO, messages as
protobuf/msgpack, arrays as raw bytes. Checks the source of every module the controller, the
workers and the client import (the Ray backend only places processes, and is exempt)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve"}
SERVER_MODULES = sorted(
    p for package in ("runtime", "scheduler", "proto") for p in (ROOT / package).rglob("*.py")
    if p.relative_to(ROOT).as_posix() != "runtime/cluster/ray_cluster.py")


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):  # every import, also those inside functions
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", SERVER_MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_server_modules_import_no_pickler(path):
    assert not imported_modules(path) & FORBIDDEN


def test_the_check_sees_imports():
    assert {"numpy", "ml_dtypes"} <= imported_modules(ROOT / "proto" / "wire.py")
    # Every room of every process is checked, not only the top of each package.
    checked = {p.relative_to(ROOT).parent.as_posix() for p in SERVER_MODULES}
    assert {"runtime/client", "runtime/controller", "runtime/worker", "runtime/sim",
            "runtime/proxy", "scheduler", "proto"} <= checked
    assert len(SERVER_MODULES) >= 80
