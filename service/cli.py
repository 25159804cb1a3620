"""Operator commands::

    python -m service.cli migrate              # alembic upgrade head on QAAS_DATABASE_URL
    python -m service.cli create-key --owner alice   # prints the new API key once
    python -m service.cli reap                 # run the reaper once
"""

from __future__ import annotations

import argparse
import json
import sys

from service.db.migrate import ensure_schema, upgrade
from service.db.session import make_engine, make_session_factory, session_scope
from service.security import create_api_key
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="upgrade the database schema to head")
    key = sub.add_parser("create-key", help="create an API key (printed once, stored hashed)")
    key.add_argument("--owner", required=True)
    sub.add_parser("reap", help="fail expired jobs and requeue orphaned ones now")
    args = parser.parse_args(argv)

    settings = Settings()
    settings.ensure_dirs()
    engine = make_engine(settings.database_url)
    try:
        if args.command == "migrate":
            upgrade(engine)
            print("database at head")
            return 0
        ensure_schema(engine, settings.auto_migrate)
        factory = make_session_factory(engine)
        if args.command == "create-key":
            with session_scope(factory) as session:
                created = create_api_key(session, args.owner)
                plaintext, key_id = created.plaintext, created.record.key_id
            print(f"API key for {args.owner} (key id {key_id}); store it now, it is not shown again:", file=sys.stderr)
            print(plaintext)
            return 0
        if args.command == "reap":
            from service.jobs import reap
            from workers.app import CeleryDispatcher, create_celery_app

            with factory() as session:
                report = reap(session, settings, CeleryDispatcher(create_celery_app(settings)))
            print(json.dumps(report.as_dict()))
            return 0
    finally:
        engine.dispose()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
