"""``linewarden ca``: the unit's interception CA (init, show, export)."""

from __future__ import annotations

import argparse
import sys

DEFAULT_CA_DIR = "var/ca"
"""Next to the default store (./var); the same default as the ``http.ca_dir`` config key."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ca", help="manage the CA used for optional HTTPS interception")
    sub = p.add_subparsers(dest="ca_command", metavar="SUBCOMMAND", required=True)

    init = sub.add_parser("init", help="create the CA (key mode 0600) and export its certificate")
    init.add_argument("--dir", default=DEFAULT_CA_DIR, help=f"CA directory (default {DEFAULT_CA_DIR})")
    init.add_argument("--org", default="linewarden", help="organisation name in the certificate")
    init.add_argument("--cn", default=None, help="common name (default '<org> egress CA')")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--export", metavar="FILE", help="also copy the certificate to FILE")
    init.set_defaults(func=_init)

    show = sub.add_parser("show", help="print the CA's subject, fingerprint and files")
    show.add_argument("--dir", default=DEFAULT_CA_DIR)
    show.set_defaults(func=_show)

    export = sub.add_parser("export", help="copy the CA certificate (never the key) to FILE")
    export.add_argument("file")
    export.add_argument("--dir", default=DEFAULT_CA_DIR)
    export.set_defaults(func=_export)


def _init(args: argparse.Namespace) -> int:
    from proxy.tls_ca import CaError, export_cert, init_ca

    try:
        ca = init_ca(args.dir, organization=args.org, common_name=args.cn, days=args.days, force=args.force)
        if args.export:
            export_cert(args.dir, args.export)
    except CaError as e:
        print(f"linewarden ca init: {e}", file=sys.stderr)
        return 1
    _print(ca)
    if args.export:
        print(f"exported:    {args.export}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from proxy.tls_ca import CaError, load_ca

    try:
        _print(load_ca(args.dir))
    except CaError as e:
        print(f"linewarden ca show: {e}", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from proxy.tls_ca import CaError, export_cert

    try:
        out = export_cert(args.dir, args.file)
    except CaError as e:
        print(f"linewarden ca export: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _print(ca) -> None:  # type: ignore[no-untyped-def]
    print(f"subject:     {ca.subject}")
    print(f"sha256:      {ca.fingerprint_sha256}")
    print(f"key:         {ca.key_file} (0600; point mitmproxy's confdir / http.ca_dir at {ca.directory})")
    print(f"certificate: {ca.cert_file} (install on clients)")
