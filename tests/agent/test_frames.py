"""agent/frames.py: the framing both crash-safe stores share (channel store, tower store)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import SpoolError
from agent.frames import HEAD, frame, read_frames


def test_frames_read_back_in_order(tmp_path):
    path = tmp_path / "f"
    bodies = [b"one", b"", b"three" * 10]
    path.write_bytes(b"".join(frame(b) for b in bodies))
    assert [body for _, body in read_frames(path, "test store", 100)] == bodies
    assert read_frames(tmp_path / "absent", "test store", 100) == []


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.data())
def test_a_torn_tail_is_cut_off_and_stays_cut(tmp_path_factory, bodies, data):
    """A write cut at any byte of the last frame: the earlier frames survive, the torn one
    is gone, and the file is truncated so the next append starts on a frame boundary."""
    path = tmp_path_factory.mktemp("torn") / "f"
    whole = b"".join(frame(b) for b in bodies)
    last = len(frame(bodies[-1]))
    cut = data.draw(st.integers(len(whole) - last, len(whole) - 1))
    path.write_bytes(whole[:cut])
    assert [b for _, b in read_frames(path, "test store", 100)] == bodies[:-1]
    assert path.stat().st_size == len(whole) - last


def test_a_bad_frame_in_the_middle_is_corruption_not_a_torn_write(tmp_path):
    path = tmp_path / "f"
    first, second = frame(b"good"), frame(b"also good")
    damaged = first[:HEAD.size] + b"gxod" + first[HEAD.size + 4:]
    path.write_bytes(damaged + second)
    with pytest.raises(SpoolError) as info:
        read_frames(path, "test store", 100)
    assert info.value.reason == "store-corrupt" and "test store frame at 0" in str(info.value)


def test_a_frame_claiming_too_much_is_corruption(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(HEAD.pack(10_000, 0) + b"x")
    with pytest.raises(SpoolError, match="claims 10000 bytes"):
        read_frames(path, "test store", 100)
