"""People: the faces of the 'faces' step clustered into persons, incrementally, as they are stored.

The rule is Immich's facial recognition (``maxDistance``, ``minFaces``) made incremental, which amounts to
DBSCAN (eps = max distance, minPts = min faces) run one face at a time, except that two persons are never
merged automatically:

1. A new face joins the person of its nearest assigned face within the max distance.
2. Otherwise, when at least ``min_faces`` unassigned faces (itself included) lie within the max distance,
   they start a new person together.
3. Otherwise the face waits, unassigned: a later face near it may start a person, which takes it in.

After 1 or 2 the person grows through its *core* faces (faces with ``min_faces`` faces within the max
distance): each newly assigned core face takes in the unassigned faces within the max distance of it, and
so on. So a face left unassigned is never within the max distance of a core face of any person, and the
result hardly depends on the order in which faces arrive. Immich instead defers the faces that are not
core and picks them up in a nightly job; here the pick-up happens when the evidence arrives.

A user's decisions are never undone: clustering only assigns faces that have no person and that the user
did not take out of a person (``assigned_by = 'auto'``); it never moves an assigned face, merges, splits or
renames a person. Only an explicit :func:`recluster` splits a person, and the person (its id and name)
keeps the faces the user put there (a merge, a face moved to it).

Concurrency (in-process threads and Celery workers alike): every change to assignments runs in a
transaction that first takes a transaction-level advisory lock, one per library schema. The hazard is a
phantom: two workers each storing the third face of someone new would both see two unassigned neighbours
and both create a person. Row locks (``SELECT … FOR UPDATE``) cannot lock a face the other worker has not
committed yet, and SERIALIZABLE would make the faces step fail and retry on conflicts. The lock is held
from the moment an item's faces are written until its step commits: a few index lookups (the inference
runs before), so serialising them costs workers little.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from ai_service.protocol.immich_face_models import max_distance_range
from library.db import ensure_vector_index
from library.inference import Face
from library.settings import LibrarySettings

_LOCK_NAME = "immich_zh_ai.library.people"
IMMICH_MAX_DISTANCE = 0.5  # Immich's facialRecognition.maxDistance default


class PersonNotFoundError(LookupError):
    """No such person or face (HTTP 404)."""


def max_distance(settings: LibrarySettings) -> float:
    """LIBRARY_PEOPLE_MAX_DISTANCE, else the middle of the range the project records for the face model
    (ai_service.protocol.immich_face_models: dlib 0.3-0.5 -> 0.4, InsightFace 0.3-0.7 -> 0.5), else
    Immich's 0.5."""
    if settings.people_max_distance is not None:
        return settings.people_max_distance
    fitting = max_distance_range(settings.face_model or "")
    return round((fitting.low + fitting.high) / 2, 3) if fitting else IMMICH_MAX_DISTANCE


def lock(conn: psycopg.Connection[Any]) -> None:
    """Serialise changes to assignments (module docstring); held until the transaction ends."""
    if conn.info.transaction_status == TransactionStatus.IDLE:
        raise RuntimeError("people.lock needs a transaction (an autocommit statement would release it at once)")
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(current_schema()))", [_LOCK_NAME])


# ---- storing and assigning faces ---------------------------------------------------------------------------


def store_faces(conn: psycopg.Connection[Any], settings: LibrarySettings, item_id: int, faces: list[Face]) -> None:
    """The pipeline's faces step: replace the item's faces and cluster them (in the caller's transaction).
    The lock comes first: deleting old faces updates their persons, and a worker holding a person's row
    while waiting for the lock could deadlock with the lock holder."""
    if settings.people_enabled:
        lock(conn)
    insert_faces(conn, settings, item_id, faces)
    if settings.people_enabled:
        assign_item(conn, settings, item_id)


def insert_faces(conn: psycopg.Connection[Any], settings: LibrarySettings, item_id: int, faces: list[Face]) -> None:
    conn.execute("DELETE FROM face WHERE item_id = %s", [item_id])
    for n, face in enumerate(faces):
        conn.execute(
            """INSERT INTO face (item_id, n, model, x1, y1, x2, y2, score, embedding)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::vector)""",
            [item_id, n, settings.face_model, *face.box, face.score, str(face.embedding.tolist())],
        )


def assign_item(conn: psycopg.Connection[Any], settings: LibrarySettings, item_id: int) -> dict[int, int | None]:
    """Cluster the item's unassigned faces; returns face id -> person id (None: waiting)."""
    lock(conn)
    rows = conn.execute(
        "SELECT id FROM face WHERE item_id = %s AND person_id IS NULL AND assigned_by = 'auto' ORDER BY n",
        [item_id],
    ).fetchall()
    return {int(r[0]): assign_face(conn, settings, int(r[0])) for r in rows}


def cluster_waiting(conn: psycopg.Connection[Any], settings: LibrarySettings, batch: int = 200) -> int:
    """Give every waiting face (no person, not taken out by the user) its turn, oldest first: faces stored
    before people existed or while LIBRARY_PEOPLE_ENABLED was off, or left over by a recluster. Runs in
    transactions of ``batch`` faces, so pipeline workers get the lock between them. Returns how many
    faces have a person now."""
    placed, after = 0, 0
    while True:
        with conn.transaction():
            lock(conn)
            ids = [
                int(r[0])
                for r in conn.execute(
                    """SELECT id FROM face WHERE person_id IS NULL AND assigned_by = 'auto' AND id > %s
                       ORDER BY id LIMIT %s""",
                    [after, batch],
                )
            ]
            if not ids:
                return placed
            before = conn.execute("SELECT count(*) FROM face WHERE person_id IS NOT NULL").fetchone()
            for face_id in ids:
                assign_face(conn, settings, face_id)
            now = conn.execute("SELECT count(*) FROM face WHERE person_id IS NOT NULL").fetchone()
            placed += int(now[0] if now else 0) - int(before[0] if before else 0)
            after = ids[-1]


@dataclass(frozen=True)
class Neighbour:
    face_id: int
    person_id: int | None
    distance: float


def ensure_face_index(conn: psycopg.Connection[Any], dims: int) -> None:
    """The HNSW index the neighbour query uses for face vectors of ``dims`` dimensions (see ensure_vector_index)."""
    ensure_vector_index(conn, "face", dims)


def neighbour_query(dims: int) -> sql.Composed:
    """Parameters: vector, model, face id left out, vector, limit, max distance."""
    return sql.SQL(
        """WITH nearest AS MATERIALIZED (
             SELECT f.id, f.person_id, f.embedding::vector({d}) <=> %s::vector({d}) AS distance
               FROM face AS f
              WHERE vector_dims(f.embedding) = {d} AND f.model = %s AND f.id <> %s
                AND (f.person_id IS NOT NULL OR f.assigned_by = 'auto')
              ORDER BY f.embedding::vector({d}) <=> %s::vector({d})
              LIMIT %s)
           SELECT id, person_id, distance FROM nearest WHERE distance <= %s ORDER BY distance, id"""
    ).format(d=sql.Literal(dims))


def neighbours(conn: psycopg.Connection[Any], settings: LibrarySettings, face_id: int) -> list[Neighbour]:
    """Faces of the same model within the max distance of ``face_id`` (itself left out), nearest first, at
    most LIBRARY_PEOPLE_NEIGHBOURS of them; faces the user took out of a person are invisible here."""
    row = conn.execute(
        "SELECT model, embedding::text, vector_dims(embedding) FROM face WHERE id = %s", [face_id]
    ).fetchone()
    if row is None:
        return []
    model, vector, dims = str(row[0]), str(row[1]), int(row[2])
    ensure_face_index(conn, dims)
    # Exact order from the index, and its iterative scan so the model / assignment filters cannot starve
    # it; the distance cut is applied outside the LIMIT (pgvector's advice for range queries).
    conn.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")
    rows = conn.execute(
        neighbour_query(dims),
        [vector, model, face_id, vector, settings.people_neighbours, max_distance(settings)],
    ).fetchall()
    return [Neighbour(int(r[0]), None if r[1] is None else int(r[1]), float(r[2])) for r in rows]


def assign_face(conn: psycopg.Connection[Any], settings: LibrarySettings, face_id: int) -> int | None:
    """Rules 1-3 of the module docstring for one face; the caller holds the lock. A face that has a person
    already (an earlier face's growth took it in) or that the user placed is left as it is."""
    row = conn.execute("SELECT person_id, assigned_by FROM face WHERE id = %s", [face_id]).fetchone()
    if row is None or row[0] is not None or row[1] != "auto":
        return None if row is None or row[0] is None else int(row[0])
    near = neighbours(conn, settings, face_id)
    person = next((n.person_id for n in near if n.person_id is not None), None)
    if person is not None:
        members = [face_id]
    else:
        free = [n.face_id for n in near]  # none is assigned, or rule 1 would have applied
        if len(free) + 1 < settings.people_min_faces:
            return None
        person = _create_person(conn, face_id)
        members = [face_id, *free]
    _set_auto(conn, members, person)
    _grow(conn, settings, person, members)
    return person


def _grow(conn: psycopg.Connection[Any], settings: LibrarySettings, person: int, frontier: list[int]) -> None:
    """Take in the unassigned faces near the person's newly assigned core faces, transitively."""
    queue = deque(frontier)
    while queue:
        near = neighbours(conn, settings, queue.popleft())
        if len(near) + 1 < settings.people_min_faces:
            continue  # not a core face: it may belong here, but it does not vouch for its neighbours
        free = [n.face_id for n in near if n.person_id is None]
        if free:
            _set_auto(conn, free, person)
            queue.extend(free)


def _create_person(conn: psycopg.Connection[Any], face_id: int) -> int:
    row = conn.execute(
        """INSERT INTO person (model, centroid)
           SELECT model, array_fill(0::real, ARRAY[vector_dims(embedding)])::vector FROM face WHERE id = %s
           RETURNING id""",
        [face_id],
    ).fetchone()
    assert row is not None
    return int(row[0])


def _set_auto(conn: psycopg.Connection[Any], face_ids: list[int], person: int) -> None:
    conn.execute(
        "UPDATE face SET person_id = %s WHERE id = ANY(%s) AND person_id IS NULL AND assigned_by = 'auto'",
        [person, face_ids],
    )


# ---- reading --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    id: int
    name: str | None
    model: str
    face_count: int
    item_count: int
    created_at: datetime
    updated_at: datetime
    cover_face_id: int | None  # the face nearest the person's mean (blocked items left out)
    cover_item_id: int | None
    cover_box: tuple[float, float, float, float] | None


_PERSON_QUERY = """
SELECT p.id, p.name, p.model, p.face_count,
       (SELECT count(DISTINCT f.item_id) FROM face AS f WHERE f.person_id = p.id) AS item_count,
       p.created_at, p.updated_at, c.id, c.item_id, c.x1, c.y1, c.x2, c.y2
  FROM person AS p
  LEFT JOIN LATERAL (
        SELECT f.id, f.item_id, f.x1, f.y1, f.x2, f.y2 FROM face AS f
         WHERE f.person_id = p.id AND NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = f.item_id)
         ORDER BY f.embedding <=> p.centroid, f.id
         LIMIT 1) AS c ON true
"""


def _person(row: tuple[Any, ...]) -> Person:
    box = None if row[8] is None else (float(row[9]), float(row[10]), float(row[11]), float(row[12]))
    return Person(int(row[0]), row[1], str(row[2]), int(row[3]), int(row[4]), row[5], row[6], row[7], row[8], box)


def get_person(conn: psycopg.Connection[Any], person_id: int) -> Person:
    row = conn.execute(_PERSON_QUERY + " WHERE p.id = %s", [person_id]).fetchone()
    if row is None:
        raise PersonNotFoundError(f"no person {person_id}")
    return _person(row)


def list_people(
    conn: psycopg.Connection[Any], limit: int, offset: int, named: bool | None = None
) -> tuple[int, list[Person]]:
    """(total, one page) of the people with faces or a name, most faces first."""
    where = "WHERE (p.face_count > 0 OR p.name IS NOT NULL) AND (%s::boolean IS NULL OR (p.name IS NOT NULL) = %s)"
    total = conn.execute(f"SELECT count(*) FROM person AS p {where}", [named, named]).fetchone()
    rows = conn.execute(
        _PERSON_QUERY + where + " ORDER BY p.face_count DESC, p.id LIMIT %s OFFSET %s", [named, named, limit, offset]
    ).fetchall()
    return (int(total[0]) if total else 0), [_person(r) for r in rows]


def person_item_ids(conn: psycopg.Connection[Any], person_id: int, limit: int, offset: int) -> tuple[int, list[int]]:
    """(total, one page) of the ids of the items showing the person, newest first; blocked items left out."""
    get_person(conn, person_id)
    base = """FROM face AS f WHERE f.person_id = %s
              AND NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = f.item_id)"""
    total = conn.execute(f"SELECT count(DISTINCT f.item_id) {base}", [person_id]).fetchone()
    rows = conn.execute(
        f"SELECT DISTINCT f.item_id {base} ORDER BY f.item_id DESC LIMIT %s OFFSET %s", [person_id, limit, offset]
    ).fetchall()
    return (int(total[0]) if total else 0), [int(r[0]) for r in rows]


def item_faces(conn: psycopg.Connection[Any], item_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT id, n, x1, y1, x2, y2, score, person_id, assigned_by FROM face WHERE item_id = %s ORDER BY n",
        [item_id],
    ).fetchall()
    return [
        {
            "id": int(r[0]),
            "n": int(r[1]),
            "box": [float(v) for v in r[2:6]],
            "score": float(r[6]),
            "person_id": None if r[7] is None else int(r[7]),
            "assigned_by": str(r[8]),
        }
        for r in rows
    ]


# ---- a user's decisions -------------------------------------------------------------------------------------


def _clean_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = " ".join(name.split())
    if len(name) > 200:
        raise ValueError("a name is at most 200 characters")
    return name or None


def rename(conn: psycopg.Connection[Any], person_id: int, name: str | None) -> Person:
    """Set (or with None / blank, clear) a person's name."""
    with conn.transaction():
        lock(conn)
        done = conn.execute(
            "UPDATE person SET name = %s, updated_at = now() WHERE id = %s", [_clean_name(name), person_id]
        ).rowcount
        if not done:
            raise PersonNotFoundError(f"no person {person_id}")
        return get_person(conn, person_id)


def merge(conn: psycopg.Connection[Any], into: int, sources: list[int], name: str | None = None) -> Person:
    """Move every face of ``sources`` to ``into`` and delete them. All the faces of the result become the
    user's decision (a later recluster keeps them together). The name: ``name`` when given, else ``into``'s, else the
    first named source's."""
    sources = list(dict.fromkeys(s for s in sources if s != into))
    if not sources:
        raise ValueError("merge needs at least one other person than the target")
    with conn.transaction():
        lock(conn)
        ids = [into, *sources]
        found = {
            int(r[0]): (r[1], str(r[2]))
            for r in conn.execute("SELECT id, name, model FROM person WHERE id = ANY(%s)", [ids])
        }
        missing = [i for i in ids if i not in found]
        if missing:
            raise PersonNotFoundError(f"no person {missing[0]}")
        if len({model for _, model in found.values()}) > 1:
            raise ValueError("these people come from different face models; their faces cannot be compared")
        chosen = _clean_name(name) or found[into][0] or next((found[s][0] for s in sources if found[s][0]), None)
        # All of the result's faces become the user's: a later recluster must not undo the merge.
        conn.execute("UPDATE face SET assigned_by = 'user' WHERE person_id = %s", [into])
        conn.execute("UPDATE face SET person_id = %s, assigned_by = 'user' WHERE person_id = ANY(%s)", [into, sources])
        conn.execute("DELETE FROM person WHERE id = ANY(%s)", [sources])
        conn.execute("UPDATE person SET name = %s, updated_at = now() WHERE id = %s", [chosen, into])
        return get_person(conn, into)


def set_face_person(conn: psycopg.Connection[Any], face_id: int, person_id: int | None) -> dict[str, Any]:
    """Put a face in a person, or (None) take it out of its person for good: clustering leaves it alone.
    A person left without faces and without a name is deleted."""
    with conn.transaction():
        lock(conn)
        row = conn.execute("SELECT item_id, person_id, model FROM face WHERE id = %s", [face_id]).fetchone()
        if row is None:
            raise PersonNotFoundError(f"no face {face_id}")
        item_id, old, model = int(row[0]), row[1], str(row[2])
        if person_id is not None:
            target = conn.execute("SELECT model FROM person WHERE id = %s", [person_id]).fetchone()
            if target is None:
                raise PersonNotFoundError(f"no person {person_id}")
            if str(target[0]) != model:
                raise ValueError(f"person {person_id} is made of {target[0]} faces; this face is from {model}")
        conn.execute("UPDATE face SET person_id = %s, assigned_by = 'user' WHERE id = %s", [person_id, face_id])
        if old is not None and old != person_id:
            _drop_if_empty(conn, [int(old)])
        return next(f for f in item_faces(conn, item_id) if f["id"] == face_id)


def _drop_if_empty(conn: psycopg.Connection[Any], person_ids: list[int]) -> None:
    conn.execute("DELETE FROM person WHERE id = ANY(%s) AND face_count = 0 AND name IS NULL", [person_ids])


@dataclass(frozen=True)
class ReclusterResult:
    person_id: int
    kept: int  # faces left in the person
    new_people: list[int]  # people made of faces split off
    unassigned: int  # faces near no group, now waiting for new evidence


def recluster(conn: psycopg.Connection[Any], settings: LibrarySettings, person_id: int) -> ReclusterResult:
    """Split a person whose faces fell into several groups: DBSCAN (the same max distance and min faces as
    clustering) over its faces. The groups holding faces the user put there (else the largest group) stay
    this person, with its id and name; the other groups become new people; faces in no group are
    unassigned. Faces the user put there never move."""
    with conn.transaction():
        lock(conn)
        get_person(conn, person_id)
        rows = conn.execute(
            "SELECT id, assigned_by, embedding::real[] FROM face WHERE person_id = %s ORDER BY id", [person_id]
        ).fetchall()
        if len(rows) > settings.people_recluster_max_faces:
            raise ValueError(
                f"person {person_id} has {len(rows)} faces; recluster splits at most "
                f"{settings.people_recluster_max_faces} (LIBRARY_PEOPLE_RECLUSTER_MAX_FACES)"
            )
        if not rows:
            return ReclusterResult(person_id, 0, [], 0)
        ids = np.array([int(r[0]) for r in rows])
        pinned = np.array([r[1] == "user" for r in rows])
        labels = dbscan(
            np.array([r[2] for r in rows], dtype=np.float32), max_distance(settings), settings.people_min_faces
        )
        moving = ~pinned & ~np.isin(labels, _kept_labels(labels, pinned))
        new_people: list[int] = []
        if moving.any():
            conn.execute("UPDATE face SET person_id = NULL WHERE id = ANY(%s)", [ids[moving].tolist()])
        for label in sorted(set(labels[moving].tolist()) - {-1}):
            group = ids[moving & (labels == label)].tolist()
            person = _create_person(conn, group[0])
            _set_auto(conn, group, person)
            new_people.append(person)
        unassigned = int((moving & (labels == -1)).sum())
        _drop_if_empty(conn, [person_id])
        return ReclusterResult(person_id, int((~moving).sum()), new_people, unassigned)


def _kept_labels(labels: np.ndarray, pinned: np.ndarray) -> list[int]:
    """The groups that stay the person: every group holding a face the user put there (the user said they
    are this person), else the largest group (the lowest label on a tie)."""
    with_pins = sorted(set(labels[pinned].tolist()) - {-1})
    if with_pins:
        return with_pins
    groups = sorted(set(labels.tolist()) - {-1})
    return [max(groups, key=lambda g: (int((labels == g).sum()), -g))] if groups else []


def dbscan(vectors: np.ndarray, eps: float, min_points: int, chunk: int = 512) -> np.ndarray:
    """Labels (0, 1, … per group; -1 for faces in none) of DBSCAN with cosine distance: groups are the
    connected components of core points (``min_points`` within ``eps``, itself included); a border point
    joins the group of its nearest core point."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    n = len(unit)
    near = np.zeros((n, n), dtype=bool)  # n <= LIBRARY_PEOPLE_RECLUSTER_MAX_FACES
    for start in range(0, n, chunk):
        near[start : start + chunk] = 1.0 - unit[start : start + chunk] @ unit.T <= eps
    core = near.sum(axis=1) >= min_points
    labels = np.full(n, -1)
    group = 0
    for seed in np.flatnonzero(core):
        if labels[seed] != -1:
            continue
        labels[seed] = group
        queue = deque([int(seed)])
        while queue:
            for other in np.flatnonzero(near[queue.popleft()] & core & (labels == -1)):
                labels[other] = group
                queue.append(int(other))
        group += 1
    cores = np.flatnonzero(core)
    for border in np.flatnonzero(~core):
        reach = cores[near[border, cores]]
        if len(reach):
            labels[border] = labels[reach[np.argmax(unit[reach] @ unit[border])]]
    return labels
