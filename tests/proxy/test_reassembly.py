"""Tests for proxy/reassembly.py: order, retransmission, overlap, holes, wraparound, limits."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.reassembly import Gap, HalfStream, ReassemblyLimits

ISN = 5000


def _joined(out: list[bytes | Gap]) -> bytes:
    return b"".join(c if isinstance(c, bytes) else b"?" * c.length for c in out)


def _segments(data: bytes, cuts: list[int], base: int) -> list[tuple[int, bytes]]:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [((base + a) & 0xFFFFFFFF, data[a:b]) for a, b in zip(edges, edges[1:]) if b > a]


def _run(h: HalfStream, segs: list[tuple[int, bytes]]) -> list[bytes | Gap]:
    out: list[bytes | Gap] = []
    for seq, d in segs:
        out += h.segment(seq, d)
    return out


def test_in_order_segments_are_delivered_as_they_come() -> None:
    h = HalfStream()
    h.syn(ISN)
    assert h.segment(ISN + 1, b"abc") == [b"abc"]
    assert h.segment(ISN + 4, b"def") == [b"def"]
    assert h.stats.delivered == 6


def test_out_of_order_segment_waits_for_the_hole() -> None:
    h = HalfStream()
    h.syn(ISN)
    assert h.segment(ISN + 4, b"def") == []
    assert h.segment(ISN + 1, b"abc") == [b"abc", b"def"]
    assert h.stats.out_of_order == 1


def test_exact_retransmission_is_dropped() -> None:
    h = HalfStream()
    h.syn(ISN)
    h.segment(ISN + 1, b"abc")
    assert h.segment(ISN + 1, b"abc") == []
    assert h.stats.retransmitted_bytes == 3


def test_overlapping_retransmission_contributes_only_new_bytes_first_copy_wins() -> None:
    h = HalfStream()
    h.syn(ISN)
    h.segment(ISN + 1, b"abcd")
    assert h.segment(ISN + 3, b"XYef") == [b"ef"]  # "XY" overlaps delivered "cd": first copy wins
    assert h.stats.overlap_bytes == 2


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3000),
    cuts=st.lists(st.integers(0, 4000), max_size=40),
    dup=st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 200)), max_size=10),
    isn=st.sampled_from([0, 5000, 0xFFFFFFFF - 700, 0xFFFFFFFF]),
    seed=st.integers(0, 2**32),
)
def test_any_order_duplicates_and_overlaps_give_the_stream_back(data, cuts, dup, isn, seed) -> None:  # type: ignore[no-untyped-def]
    base = (isn + 1) & 0xFFFFFFFF
    segs = _segments(data, cuts, base)
    # Overlapping retransmissions with other boundaries but the same bytes.
    for start, length in dup:
        start %= len(data)
        segs.append(((base + start) & 0xFFFFFFFF, data[start : start + length]))
    random.Random(seed).shuffle(segs)
    h = HalfStream()
    h.syn(isn)
    out = _run(h, segs) + h.flush()
    assert _joined(out) == data
    assert not any(isinstance(c, Gap) for c in out)


def test_one_byte_segments_reversed() -> None:
    data = bytes(range(256)) * 4
    h = HalfStream()
    h.syn(ISN)
    segs = [(ISN + 1 + i, data[i : i + 1]) for i in range(len(data))]
    out = _run(h, segs[::-1])
    assert _joined(out) == data


def test_sequence_wraparound_mid_stream() -> None:
    isn = 0xFFFFFFFF - 3
    h = HalfStream()
    h.syn(isn)
    out = h.segment(0xFFFFFFFD, b"abcdef") + h.segment(3, b"ghi")  # bytes 2^32-3 .. 2^32+5
    assert _joined(out) == b"abcdefghi"


def test_stream_longer_than_4_gib_of_sequence_space_unwraps() -> None:
    h = HalfStream()
    h.syn(ISN)
    seq, total = ISN + 1, 0
    chunk = b"z" * 65536
    for _ in range(70_000):  # 4.6 GB of sequence space
        out = h.segment(seq & 0xFFFFFFFF, chunk)
        assert out == [chunk]
        seq += len(chunk)
        total += len(chunk)
    assert h.next == total > 2**32


def test_missing_segment_is_reported_as_gap_on_flush_and_stream_continues() -> None:
    h = HalfStream()
    h.syn(ISN)
    out = h.segment(ISN + 1, b"abc") + h.segment(ISN + 10, b"xyz")
    assert out == [b"abc"]
    assert h.flush() == [Gap(6), b"xyz"]
    assert h.segment(ISN + 13, b"more") == [b"more"]
    assert h.stats.gaps == 1 and h.stats.gap_bytes == 6


def test_pending_byte_limit_gives_up_on_the_hole() -> None:
    h = HalfStream(ReassemblyLimits(max_pending_bytes=100))
    h.syn(ISN)
    out: list[bytes | Gap] = []
    for i in range(5):
        out += h.segment(ISN + 1 + 10 + i * 30, b"q" * 30)
    assert out and out[0] == Gap(10)
    assert h.pending_bytes <= 100


def test_pending_segment_limit_gives_up_on_the_hole() -> None:
    h = HalfStream(ReassemblyLimits(max_pending_segments=4))
    h.syn(ISN)
    out: list[bytes | Gap] = []
    for i in range(6):
        out += h.segment(ISN + 2 + i, b"x")
    assert out[0] == Gap(1)
    assert len(h.pending) <= 4


def test_fin_ends_the_stream_and_later_data_is_ignored() -> None:
    h = HalfStream()
    h.syn(ISN)
    h.segment(ISN + 1, b"abc", fin=True)
    assert h.finished
    assert h.segment(ISN + 4, b"late") == []
    assert h.stats.after_fin == 4


def test_fin_before_a_hole_fills_finishes_when_it_does() -> None:
    h = HalfStream()
    h.syn(ISN)
    assert h.segment(ISN + 4, b"def", fin=True) == []
    assert not h.finished
    assert h.segment(ISN + 1, b"abc") == [b"abc", b"def"]
    assert h.finished


def test_fin_with_missing_bytes_is_flagged_on_flush() -> None:
    h = HalfStream()
    h.syn(ISN)
    h.segment(ISN + 1, b"abc")
    h.segment(ISN + 8, b"", fin=True)
    assert h.flush() == [Gap(4)]
    assert h.finished


def test_reset_delivers_buffered_data_and_ends() -> None:
    h = HalfStream()
    h.syn(ISN)
    h.segment(ISN + 5, b"tail")
    assert h.reset() == [Gap(4), b"tail"]
    assert h.finished


def test_midstream_pickup_starts_at_first_segment() -> None:
    h = HalfStream()
    assert h.segment(123456, b"mid") == [b"mid"]
    assert h.midstream
    assert h.segment(123459, b"dle") == [b"dle"]
