"""The planner against fakes of what it talks to: it reads the session records it is given and
changes them only through the sessions component (runtime.controller.sessions.SessionUsage)."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto.errors import ResourceExhaustedError
from runtime.controller.planner import Planner
from runtime.controller.sessions import ID_BITS, Session, SessionLedger
from scheduler.readiness import Readiness


class FakeSessions:
    """SessionUsage that logs every call and replaces the session's sets with frozen copies, so
    a planner that changed a record itself would raise."""

    def __init__(self, room: bool = True) -> None:
        self.calls: list[tuple] = []
        self.room = room

    def check_room(self, session, adding, nbytes, freeing=0):
        self.calls.append(("check_room", session.session_id, adding, nbytes, freeing))
        if not self.room:
            raise ResourceExhaustedError("no room (fake)")

    def record_array(self, session, array_id, nbytes):
        self.calls.append(("record_array", session.session_id, array_id, nbytes))
        session.arrays = frozenset(session.arrays | {array_id})
        session.nbytes += nbytes

    def forget_array(self, session, array_id, nbytes):
        self.calls.append(("forget_array", session.session_id, array_id, nbytes))
        session.arrays = frozenset(session.arrays - {array_id})
        session.nbytes -= nbytes

    def record_program(self, session, program_id):
        self.calls.append(("record_program", session.session_id, program_id))
        session.programs = frozenset(session.programs | {program_id})

    def forget_programs(self, session):
        self.calls.append(("forget_programs", session.session_id))
        ids, session.programs = sorted(session.programs), frozenset()
        return ids


class _Ticket:
    """An OrderTicket already ordered at sequence numbers 1, 2, ..."""

    def __init__(self, count: int) -> None:
        self.done = threading.Event()
        self.done.set()
        self.failed: dict = {}
        self.count = count

    def result(self) -> list[int]:
        return list(range(1, self.count + 1))


class _Resources:
    def lost_host(self, island: int):
        return None


class FakeCatalog:
    """The parts of CatalogView a delete needs; records what it orders per island."""

    limits = _limits.DEFAULT
    resources = _Resources()

    def __init__(self) -> None:
        self.ordered: list[tuple[int, list[pb.Instruction]]] = []

    def orderer(self, session):
        def order(island, ops):
            self.ordered.append((island, list(ops)))
            return _Ticket(len(ops))
        return order


def _planner(catalog: FakeCatalog, sessions: FakeSessions) -> Planner:
    return Planner(catalog, sessions, Readiness(), lambda source_island, island, spec: None)


def _session() -> Session:
    return dataclasses.replace(Session(3, "fake"), arrays=frozenset(), programs=frozenset())


def _spec(array_id: int) -> pb.ArraySpec:
    return pb.ArraySpec(array_id=array_id, dtype="float32", shape=[4],
                        sharding=pb.Sharding(slice_id=7))


def test_planner_changes_sessions_only_through_the_sessions_component():
    sessions, catalog, session = FakeSessions(), FakeCatalog(), _session()
    planner = _planner(catalog, sessions)
    a, b = (3 << ID_BITS) + 1, (3 << ID_BITS) + 2
    planner.add(session, _spec(a), island=0, nbytes=100)
    planner.add(session, _spec(b), island=0, nbytes=60)
    assert session.arrays == {a, b} and session.nbytes == 160
    assert planner.slice_arrays(7) == {a, b}

    # Quota accounting is the sessions component's: the planner hands it the bytes freed.
    planner.check_room(session, 1, 50, freed=[a])
    assert sessions.calls[-1] == ("check_room", 3, 1, 50, 100)

    # A delete command forgets the array through the component and orders a delete on its island.
    results, n, emitted = planner.execute(
        session, [pb.Command(delete=pb.DeleteCommand(array_ids=[a]))])
    assert n == 1 and emitted == 1 and results(1.0) == [pb.CommandResult()]
    assert ("forget_array", 3, a, 100) in sessions.calls
    assert session.arrays == {b} and session.nbytes == 60 and a not in planner.arrays
    [(island, [op])] = catalog.ordered
    assert island == 0 and list(op.delete.array_ids) == [a]


def test_planner_programs_and_session_end_go_through_the_sessions_component():
    sessions, catalog, session = FakeSessions(), FakeCatalog(), _session()
    planner = _planner(catalog, sessions)
    program = planner.plan_program(session, pb.RegisterProgramRequest(name="empty"))
    program_id = planner.add_program(session, program)
    assert ("record_program", 3, program_id) in sessions.calls
    assert session.programs == {program_id} and program_id in planner.programs
    planner.add(session, _spec((3 << ID_BITS) + 5), island=1, nbytes=8)

    planner.drop_session(session)
    assert ("forget_programs", 3) in sessions.calls
    assert ("forget_array", 3, (3 << ID_BITS) + 5, 8) in sessions.calls
    assert session.programs == frozenset() and session.arrays == frozenset()
    assert planner.programs == {} and planner.array_count == 0


def test_a_command_without_room_fails_alone():
    sessions, catalog, session = FakeSessions(room=False), FakeCatalog(), _session()
    planner = _planner(catalog, sessions)
    with pytest.raises(ResourceExhaustedError, match="no room"):
        planner.check_room(session, 1, 1)
    assert not [c for c in sessions.calls if c[0] == "record_array"]


@dataclasses.dataclass
class _Bounds:
    limits: _limits.Limits
    session_quota_bytes: int | None


def test_session_ledger_counts_arrays_and_bytes_against_limit_and_quota():
    bounds = _Bounds(dataclasses.replace(_limits.DEFAULT, arrays_per_session=2), 100)
    ledger, session = SessionLedger(bounds), Session(1, "s")
    ledger.record_array(session, 10, 60)
    assert session.arrays == {10} and session.nbytes == 60
    ledger.check_room(session, 1, 40)
    with pytest.raises(ResourceExhaustedError, match="would hold 101 bytes .* quota of 100"):
        ledger.check_room(session, 1, 41)
    ledger.check_room(session, 1, 41, freeing=60)  # a donated input frees its bytes
    with pytest.raises(ResourceExhaustedError, match="3 arrays, over its limit of 2"):
        ledger.check_room(session, 2, 0)
    bounds.session_quota_bytes = None  # read at each check: no quota, only the array limit
    ledger.check_room(session, 1, 10**12)
    ledger.forget_array(session, 10, 60)
    assert session.arrays == set() and session.nbytes == 0
    ledger.record_program(session, 4)
    assert ledger.forget_programs(session) == [4] and session.programs == set()


def test_session_ledger_keeps_slices_and_executables():
    ledger, session = SessionLedger(_Bounds(_limits.DEFAULT, None)), Session(1, "s")
    ledger.record_slice(session, 5)
    ledger.record_executable(session, 9, 1000)
    assert session.slices == {5} and session.executables == {9}
    assert session.executable_bytes == 1000
    ledger.forget_executable(session, 9, 1000)
    ledger.forget_slice(session, 5)
    assert not session.slices and not session.executables and session.executable_bytes == 0
