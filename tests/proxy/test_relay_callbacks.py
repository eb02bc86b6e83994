"""proxy/relay.py's direct calls for callback-driven connections (``Side.on_lost``,
``_Joined.on_end``): each made once, after the state a caller reads is set."""

from __future__ import annotations

from proxy.relay import Side, _Joined


async def test_on_lost_is_called_once_when_the_socket_is_gone() -> None:
    side = Side()
    seen: list[tuple[bool, bool, bool]] = []
    side.on_lost = lambda: seen.append((side.lost, side.reset, side.closed.done()))
    side.connection_lost(ConnectionResetError())
    assert seen == [(True, True, True)] and side.on_lost is None


async def test_on_end_is_called_once_with_the_end_already_set() -> None:
    joined = _Joined("copy")
    seen: list[tuple[bool, bool]] = []
    joined.on_end = lambda: seen.append((joined.over.done(), joined.hand_over))
    joined.end(hand_over=True)
    joined.end(hand_over=False)  # a second end changes nothing
    assert seen == [(True, True)]


async def test_closed_and_over_are_done_whether_awaited_before_or_after_the_end() -> None:
    """``Side.closed`` and ``_Joined.over`` are made on first use: a coroutine that
    asks before the end is woken by it, one that asks after finds them done."""
    early, late = Side(), Side()
    waiting = early.closed
    assert not waiting.done()
    for side in (early, late):
        side.connection_lost(None)
    assert waiting.done() and early.closed is waiting and late.closed.done()
    assert not late.reset

    before, after = _Joined("copy"), _Joined("copy")
    over = before.over
    for joined in (before, after):
        joined.end(hand_over=False)
    assert over.done() and after.over.done() and after.ended and not after.hand_over
