"""The one SSE parser: any chunking of a valid stream gives the same events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import DONE_EVENT, Event, SSEParser, SSEProtocolError, format_event

EOLS = ("\n", "\r\n", "\r")
field_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"), max_size=30
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[str | None]]:
    """A stream with mixed line endings, comments and multi-line data; its expected data."""
    out: list[str] = []
    expected: list[str | None] = []
    for _ in range(draw(st.integers(0, 8))):
        eol = draw(st.sampled_from(EOLS))
        kind = draw(st.sampled_from(["data", "comment", "named"]))
        if kind == "comment":
            out.append(f":{draw(field_text)}{eol}{eol}")
            expected.append(None)
            continue
        lines = draw(st.lists(field_text, min_size=1, max_size=3))
        block = "".join(f"data: {line}{eol}" for line in lines)
        if kind == "named":
            block = f"event: x{eol}id: 7{eol}" + block
        out.append(block + eol)
        expected.append("\n".join(lines))
    return "".join(out).encode(), expected


def feed_split(data: bytes, cuts: list[int], max_event_bytes: int = 1 << 20) -> list[Event]:
    parser = SSEParser(max_event_bytes)
    events: list[Event] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events += parser.feed(data[last:cut])
        last = cut
    events += parser.flush()
    assert parser.close() is None
    return events


@settings(max_examples=400, deadline=None)
@given(streams(), st.data())
def test_any_split_gives_the_same_events_and_keeps_every_byte(
    stream: tuple[bytes, list[str | None]], data: st.DataObject
) -> None:
    raw, expected = stream
    cuts = data.draw(st.lists(st.integers(0, max(len(raw), 0)), max_size=20))
    events = feed_split(raw, cuts)
    assert [e.data for e in events] == expected
    assert b"".join(e.raw for e in events) == raw


def test_split_inside_a_multibyte_character() -> None:
    raw = "data: naïve 日本語 🙂\n\n".encode()
    for cut in range(len(raw) + 1):
        assert [e.data for e in feed_split(raw, [cut])] == ["naïve 日本語 🙂"]


def test_crlf_split_between_cr_and_lf_is_one_line_ending() -> None:
    raw = b"data: a\r\n\r\ndata: b\r\n\r\n"
    for cut in range(len(raw) + 1):
        events = feed_split(raw, [cut])
        assert [e.data for e in events] == ["a", "b"]
        assert b"".join(e.raw for e in events) == raw
        assert [e.raw for e in events] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]


def test_an_event_whose_last_cr_ends_a_read_waits_for_the_next_byte() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]\r\n\r") == []  # is a \n coming?
    (done,) = parser.feed(b"\n")
    assert done.raw == b"data: [DONE]\r\n\r\n" and done.is_done
    assert parser.feed(b"data: x\r\r") == []
    (event,) = parser.flush()  # the input ended: that \r was the line's end
    assert event.raw == b"data: x\r\r" and event.data == "x"


def test_fields_follow_the_spec() -> None:
    (event,) = SSEParser().feed(b"event: ping\nid: 42\nretry: 1500\ndata\ndata:x\n\n")
    assert (event.event, event.id, event.retry, event.data) == ("ping", "42", 1500, "\nx")


def test_comment_only_block_has_no_data_but_keeps_its_bytes() -> None:
    (event,) = SSEParser().feed(b": keep-alive\n\n")
    assert event.data is None and event.raw == b": keep-alive\n\n"


def test_oversized_event_is_a_protocol_error_not_unbounded_memory() -> None:
    parser = SSEParser(max_event_bytes=100)
    parser.feed(b"data: " + b"x" * 90)
    with pytest.raises(SSEProtocolError):
        parser.feed(b"x" * 20)


def test_many_small_events_in_one_chunk_are_all_returned() -> None:
    chunk = b"".join(format_event(str(i)) for i in range(1000)) + DONE_EVENT
    events = SSEParser(max_event_bytes=64).feed(chunk)
    assert [e.data for e in events] == [str(i) for i in range(1000)] + ["[DONE]"]
    assert events[-1].is_done


def test_incomplete_tail_is_returned_by_close() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: complete\n\ndata: cut") != []
    leftover = parser.close()
    assert leftover is not None and leftover.raw == b"data: cut" and leftover.data is None


def test_format_event_frames_newlines_as_data_lines() -> None:
    assert format_event("a\nb") == b"data: a\ndata: b\n\n"
    (event,) = SSEParser().feed(format_event("a\r\nb"))
    assert event.data == "a\nb"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["data", "comment", "named", "blank"]), field_text)))
def test_whole_chunks_take_the_fast_path_and_agree_with_byte_by_byte(
    blocks: list[tuple[str, str]],
) -> None:
    # Plain "data: " events in whole chunks skip the line-by-line parser; the
    # result must not differ from feeding the same bytes one at a time.
    text = {
        "data": "data: {}\n\n",
        "comment": ": {}\n\n",
        "named": "event: x\ndata: {}\n\n",
        "blank": "\n",
    }
    raw = "".join(text[kind].format(value) for kind, value in blocks).encode()
    whole = SSEParser().feed(raw)
    by_byte = feed_split(raw, list(range(len(raw))))
    assert [(e.raw, e.data, e.event) for e in whole] == [(e.raw, e.data, e.event) for e in by_byte]
