"""linewarden: composition of rules, proxy and storage into one command.

Kept thin (DESIGN.md): the CLI, config loading and starting the services.
"""

__version__ = "0.1.0"
