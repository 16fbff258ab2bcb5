"""`neuroserve keys create|list|revoke`: manage the API keys file a server reads with --api-keys-file
(a running server picks changes up within seconds, or at once on SIGHUP)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.auth.keys import SCOPES, KeyFileError, create_key, parse_scopes, read_keys, revoke_key


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = commands.add_parser("keys", help="create, list or revoke API keys",
                               description="API keys for `neuroserve serve --api-keys-file FILE`.")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="add a key; its secret is printed once and stored nowhere")
    create.add_argument("--file", type=Path, required=True, help="the keys file (created if absent)")
    create.add_argument("--name", required=True, help="the key's name, as logs and metrics show it")
    create.add_argument("--scopes", default="infer",
                        help=f"comma-separated, of {', '.join(SCOPES)} (admin implies infer)")
    create.add_argument("--rate", type=float, default=0.0,
                        help="requests per second per worker (0: no limit)")
    create.add_argument("--rows", type=float, default=0.0,
                        help="rows (inputs) per second per worker (0: no limit)")
    create.add_argument("--priority", type=int, default=0,
                        help="the key's priority class (recorded for the batcher)")
    listing = actions.add_parser("list", help="the keys' names, scopes and limits (never secrets)")
    listing.add_argument("--file", type=Path, required=True)
    revoke = actions.add_parser("revoke", help="remove a key")
    revoke.add_argument("--file", type=Path, required=True)
    revoke.add_argument("name")


def run(args: argparse.Namespace) -> int:
    try:
        if args.keys_command == "create":
            secret = create_key(args.file, args.name, parse_scopes(args.scopes), args.rate, args.priority,
                                args.rows)
            print(secret)
            print(f"key {args.name!r} added to {args.file}; the secret above is shown only now",
                  file=sys.stderr)
        elif args.keys_command == "list":
            for key in sorted(read_keys(args.file).values(), key=lambda k: k.name):
                print(f"{key.name}\tscopes={','.join(sorted(key.scopes))}\trate={key.rate:g}\t"
                      f"rows={key.rows:g}\tpriority={key.priority}\tcreated={key.created}")
        else:
            revoke_key(args.file, args.name)
            print(f"key {args.name!r} revoked", file=sys.stderr)
    except KeyFileError as e:
        print(f"neuroserve keys: {e}", file=sys.stderr)
        return 2
    return 0
