"""``linewarden keys init|show``: the appliance's Ed25519 signing key."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from linewarden.keys import DEFAULT_KEY_DIR

    p = sub.add_parser("keys", help="manage the appliance's Ed25519 signing key")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    init = ks.add_parser("init", help="generate the key pair (private key mode 0600)")
    init.add_argument("--dir", default=DEFAULT_KEY_DIR, help=f"key directory (default {DEFAULT_KEY_DIR})")
    init.add_argument("--force", action="store_true", help="replace an existing key (old signatures then need the old public key)")
    init.set_defaults(func=_init)
    show = ks.add_parser("show", help="print the public key and its fingerprint")
    show.add_argument("--dir", default=DEFAULT_KEY_DIR, help=f"key directory (default {DEFAULT_KEY_DIR})")
    show.set_defaults(func=_show)


def _init(args: argparse.Namespace) -> int:
    import sys

    from linewarden import keys

    try:
        pair = keys.generate(args.dir, force=args.force)
    except keys.KeyProblem as exc:
        print(f"linewarden keys: {exc}", file=sys.stderr)
        return 1
    print(f"created {args.dir}/{keys.PRIVATE_NAME} (0600) and {keys.PUBLIC_NAME}: {pair.fingerprint}")
    return 0


def _show(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from linewarden import keys

    try:
        pub = keys.load_public(args.dir)
    except keys.KeyProblem as exc:
        print(f"linewarden keys: {exc}", file=sys.stderr)
        return 1
    print(keys.fingerprint(pub))
    print((Path(args.dir) / keys.PUBLIC_NAME).read_text(), end="")
    return 0
