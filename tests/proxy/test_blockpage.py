"""The 451 block page (proxy/blockpage.py)."""

from __future__ import annotations

import pytest

from proxy.blockpage import MAX_CATEGORY_CHARS, REASON, STATUS, render
from rules.wire import parse_message


def test_status_is_451_per_rfc7725() -> None:
    page = render("gambling", "Cabc123")
    assert page.status == STATUS == 451
    assert REASON == "Unavailable For Legal Reasons"


def test_names_category_and_reference_in_chinese_and_english() -> None:
    text = render("gambling", "Cabc123").body.decode("utf-8")
    assert "gambling" in text and "Cabc123" in text
    assert "类别" in text and "参考编号" in text  # Chinese
    assert "Category" in text and "Reference" in text  # English


def test_category_is_html_escaped() -> None:
    text = render("<script>x</script>", "C1").body.decode()
    assert "<script>x" not in text
    assert "&lt;script&gt;x" in text


def test_long_category_is_cut() -> None:
    text = render("c" * 500, "C1").body.decode()
    assert "c" * MAX_CATEGORY_CHARS in text
    assert "c" * (MAX_CATEGORY_CHARS + 1) not in text


def test_no_category_says_policy() -> None:
    assert "policy" in render(None, "C1").body.decode()


@pytest.mark.parametrize("keep", [True, False])
def test_wire_form_is_a_valid_http_response(keep: bool) -> None:
    page = render("porn", "Cref", blocked_by="https://gw.example.edu/policy")
    msg = parse_message(page.wire(keep_alive=keep))
    assert msg.status == 451
    assert msg.body == page.body
    headers = {k.lower(): v for k, v in msg.headers}
    assert headers[b"content-length"] == str(len(page.body)).encode()
    assert headers[b"link"] == b'<https://gw.example.edu/policy>; rel="blocked-by"'
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"connection"] == (b"keep-alive" if keep else b"close")


def test_reference_cannot_inject_headers() -> None:
    page = render("x", "C1\r\nSet-Cookie: a=b")
    wire = page.wire()
    head = wire.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nSet-Cookie" not in head


def test_page_never_contains_the_matched_text() -> None:
    # The page takes no matched text at all: only category and reference go in.
    import inspect

    params = inspect.signature(render).parameters
    assert set(params) == {"category", "reference", "blocked_by"}
