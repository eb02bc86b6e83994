"""linewarden proxy: the live adapters (mitmproxy addon, DNS shim, identity,
block page) and the offline one (pcap replay).

Asks the rules Engine what is illegal and hands records to storage; never
matches content itself and never writes SQL.
"""
