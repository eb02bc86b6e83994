"""linewarden rules: rule sets, content decoding, normalisation and the sans-IO Engine.

This package owns what is illegal and how traffic is decoded to find it. It never
opens a socket or a file on the data path, never reads the clock and never
imports ``proxy`` or ``storage`` (DESIGN.md, STYLE.md 1 and 2).
"""
