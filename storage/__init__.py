"""linewarden storage: record types, the writer, daily partitions, retention,
backup, the integrity chain, query and the uplink queue.

Knows nothing about HTTP or DNS parsing: adapters hand it finished records.
"""
