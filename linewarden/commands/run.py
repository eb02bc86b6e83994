"""`linewarden run`: start the store writer and the services (linewarden/app.py).

With no config the embedded defaults run: DNS shim on 127.0.0.1:5353, the
bundled sample rules, the store under ./var, the first nameserver of
/etc/resolv.conf as upstream. Flags override the config file.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_CONFIG = 2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="run the HTTP(S) proxy, the DNS shim and the store writer",
        description="Run linewarden: the HTTP(S) proxy, the DNS shim and the store writer. "
        "SIGTERM/SIGINT stop cleanly and flush every record.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: embedded defaults)")
    p.add_argument("--rules", metavar="DIR", help="rule-set directory (default: bundled sample rules)")
    p.add_argument("--store", metavar="DIR", help="store directory (default: ./var)")
    p.add_argument("--http-listen", metavar="HOST:PORT", help="proxy listen address (default 127.0.0.1:8080)")
    p.add_argument("--dns-listen", metavar="HOST:PORT", help="DNS listen address (default 127.0.0.1:5353)")
    p.add_argument("--dns-upstream", metavar="HOST:PORT", action="append",
                   help="upstream resolver; repeat for failover (default: first nameserver of "
                   "/etc/resolv.conf)")
    p.add_argument("--dns-workers", metavar="N", type=int,
                   help="DNS worker processes (0: in the main process)")
    p.add_argument("--mode", choices=("explicit", "transparent"), help="proxy mode: explicit (clients configured to use the proxy) or transparent "
                   "(nftables redirects LAN tcp/80 and tcp/443 to it; default explicit)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    import uvloop

    from linewarden.app import App
    from linewarden.config import ConfigError, load_config
    from rules.errors import RuleSetError
    from storage.config import StoreConfigError

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config).with_flags(
            rules=args.rules, store=args.store, http_listen=args.http_listen,
            dns_listen=args.dns_listen, dns_upstreams=args.dns_upstream, mode=args.mode)
        if args.dns_workers is not None:
            if not 0 <= args.dns_workers <= 16:
                raise ConfigError(f"--dns-workers: {args.dns_workers} is not 0-16")
            config = dataclasses.replace(
                config, dns=dataclasses.replace(config.dns, workers=args.dns_workers))
    except ConfigError as e:
        print(f"linewarden run: {e}", file=sys.stderr)
        return EXIT_CONFIG

    def ready(app: App) -> None:
        for s in app.services:
            addr = getattr(s, "udp_address", None) or getattr(s, "address", None)
            print(f"linewarden: {s.name} listening on {addr}", file=sys.stderr, flush=True)
        print(f"linewarden: store {config.store.dir}, rules {app.rules_dir} "
              f"(version {app.engine_ref.engine.version}), upstreams {list(app.upstreams)}",
              file=sys.stderr, flush=True)

    async def main() -> None:
        app = App(config)
        await app.run(ready)

    try:
        uvloop.run(main())
    except RuleSetError as e:
        for problem in e.problems:
            print(f"linewarden run: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except (ConfigError, StoreConfigError) as e:
        print(f"linewarden run: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"linewarden run: {e}", file=sys.stderr)
        return 1
    return EXIT_OK
