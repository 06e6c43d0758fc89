"""The layout shows the processes, and imports only go down (docs/architecture.md).

Every module of the project's packages is parsed with `ast` (function-level imports included), and
its imports are checked against the rooms below: which room each module belongs to, and which rooms
each room may import. A new module lands in a room by its dotted name; a new edge between rooms is
a change to `ALLOWED` here, made on purpose.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("proto", "scheduler", "runtime", "model", "benchmarks")
MAX_LINES = 500

#: Rooms by dotted prefix, longest first wins. Each room is code that runs in one process (or the
#: floor every process shares); the comment says which.
ROOMS: dict[str, str] = {
    "proto": "proto",                            # the floor: wire, errors, auth, RPC, config
    "scheduler": "scheduler",                    # controller process: resources, gang order
    "runtime.client": "runtime.client",          # the user's process
    "runtime.controller": "runtime.controller",  # the controller process
    "runtime.worker": "runtime.worker",          # each worker host's process
    "runtime.sim": "runtime.sim",                # a simulated worker platform (and its launcher)
    "runtime.proxy": "runtime.proxy",            # the IFRT proxy process
    "runtime.metrics": "runtime.metrics",        # Prometheus export, shared by both servers
    "runtime.metrics_state": "runtime.metrics",
    "runtime.server": "runtime.server",          # the servers' face (controller, worker)
    "runtime.cluster": "runtime.cluster",        # launchers: local, subprocesses, Ray
    "runtime.cli": "runtime.cli",                # the operator's `pathways` command
    "runtime": "runtime",                        # the user API's face (runtime/__init__.py)
    "model": "model",                            # PaLM, its training loop (a user program)
    "benchmarks": "benchmarks",                  # measurements of all of the above
}

#: Which rooms each room may import (besides itself). The graph these edges make is acyclic.
ALLOWED: dict[str, set[str]] = {
    "proto": set(),
    "scheduler": {"proto"},
    "runtime.metrics": {"proto"},
    "runtime.client": {"proto"},
    "runtime.worker": {"proto", "runtime.metrics"},
    "runtime.controller": {"proto", "scheduler", "runtime.metrics"},
    "runtime.server": {"proto", "runtime.controller", "runtime.worker"},
    "runtime.proxy": {"proto", "runtime.client"},
    "runtime.cluster": {"proto", "runtime.client", "runtime.controller", "runtime.worker",
                        "runtime.server"},
    "runtime.sim": {"proto", "runtime.worker", "runtime.server", "runtime.cluster"},
    "runtime": {"proto", "runtime.client", "runtime.cluster", "runtime.metrics"},
    "model": {"proto", "runtime"},
    "runtime.cli": {"proto", "runtime", "runtime.client", "runtime.controller", "runtime.worker",
                    "runtime.server", "runtime.cluster", "runtime.metrics", "runtime.sim",
                    "runtime.proxy", "model"},
    "benchmarks": {"proto", "runtime", "runtime.client", "runtime.server", "runtime.cluster",
                   "runtime.worker", "runtime.sim", "runtime.proxy", "runtime.cli", "model"},
}

#: What `import runtime` offers: the user API only (servers are behind runtime.server).
USER_API = {
    "Client", "VirtualSlice", "RemoteArray", "RemoteFunction", "CompiledFunction", "Program",
    "LocalCluster", "ProcessCluster", "RayCluster", "record_training", "serve_metrics",
    "PathwaysError", "ArrayNotFoundError", "ControllerUnavailableError", "DeadlineExceededError",
    "ExecutionError", "FailedPreconditionError", "HostLostError", "InvalidArgumentError",
    "NotFoundError", "PermissionDeniedError", "ResourceExhaustedError", "SliceUnavailableError",
    "UnauthenticatedError",
}


def _is_generated(path: pathlib.Path) -> bool:
    return path.name.endswith(("_pb2.py", "_pb2_grpc.py"))


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def room_of(module: str) -> str | None:
    """The room of a dotted module name (None: not the project's)."""
    best = None
    for prefix in ROOMS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return None if best is None else ROOMS[best]


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in `module`, relative ones resolved; `from X
    import y` counts as an import of X.y when that is a module, else of X."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in MODULES else base))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def room_edges() -> dict[tuple[str, str], list[str]]:
    """(from room, to room) -> where, for every import that crosses rooms."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module in MODULES:
        source = room_of(module)
        for line, target in imports_of(module):
            target_room = room_of(target)
            if target_room is not None and target_room != source:
                edges.setdefault((source, target_room), []).append(f"{module}:{line} {target}")
    return edges


def test_every_module_has_a_room_and_every_room_rules():
    assert not [m for m in MODULES if room_of(m) is None]
    assert set(ALLOWED) == set(ROOMS.values())


def test_imports_only_go_down():
    wrong = [f"{a} -> {b}: " + ", ".join(where) for (a, b), where in room_edges().items()
             if b not in ALLOWED[a]]
    assert not wrong, "imports outside the allowed edges:\n" + "\n".join(wrong)


def test_the_allowed_edges_have_no_cycle():
    state: dict[str, int] = {}

    def visit(room: str, path: list[str]) -> None:
        if state.get(room) == 1:
            raise AssertionError("cycle: " + " -> ".join(path + [room]))
        if state.get(room) == 2:
            return
        state[room] = 1
        for target in sorted(ALLOWED[room]):
            visit(target, path + [room])
        state[room] = 2

    for room in sorted(ALLOWED):
        visit(room, [])


def test_the_floor_and_the_scheduler_never_import_the_runtime():
    for module in MODULES:
        if room_of(module) in ("proto", "scheduler"):
            assert not [t for _, t in imports_of(module) if t.split(".")[0] == "runtime"], module


def test_no_room_imports_another_rooms_private_module():
    wrong = []
    for module in MODULES:
        for line, target in imports_of(module):
            private = any(part.startswith("_") and not part.startswith("__")
                          for part in target.split("."))
            if private and room_of(target) != room_of(module):
                wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _is_generated(MODULES[m])))
def test_no_module_is_over_500_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)}: {lines} lines"


def test_runtime_exports_the_user_api_only():
    import runtime

    assert set(runtime.__all__) == USER_API
    public = {name for name in vars(runtime) if not name.startswith("_")}
    # Subpackages become attributes once imported; anything else public must be the user API.
    extra = {name for name in public - USER_API
             if f"runtime.{name}" not in MODULES and name not in ("os", "annotations")}
    assert not extra, extra


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a floor module importing the runtime is reported."""
    fake = tmp_path / "proto" / "fake.py"
    fake.parent.mkdir()
    fake.write_text("from runtime.client.client import Client\n")
    monkeypatch.setitem(MODULES, "proto.fake", fake)
    edges = room_edges()
    assert ("proto", "runtime.client") in edges
    with pytest.raises(AssertionError, match="proto -> runtime.client"):
        test_imports_only_go_down()
