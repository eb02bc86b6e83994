"""One module per top-level command (or command group).

Each module defines ``register(subparsers)``, which adds its parser and sets
``func`` (``(args) -> int``, the exit status). Modules import their heavy
dependencies inside ``func`` so that ``linewarden --help`` stays fast.
"""
