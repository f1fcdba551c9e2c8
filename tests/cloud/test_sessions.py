"""The outbox of a streamed session (cloud/sessions.Outbox): the scheduler thread waits for the frames
it posted to be handed to the socket before its next forward, within a bound, and never for a pump
that has not started, has stopped, or is stuck in a send."""

import asyncio
import threading
import time

from costeer.cloud.scheduler import FLUSH_S
from costeer.cloud.sessions import SLOW_SEND_S, Outbox


def test_drain_waits_for_the_pump_to_hand_the_frame_over():
    loop = asyncio.new_event_loop()
    box = Outbox(loop, 4)
    box.start()
    box.post(("frame", 1, True))

    def pump():
        time.sleep(0.005)
        box.sending()
        box.sent()

    t0 = time.monotonic()
    threading.Thread(target=pump).start()
    assert box.drain(t0 + 5.0)
    assert 0.004 < time.monotonic() - t0 < 1.0  # returned when sent, not at the deadline
    loop.close()


def test_drain_gives_up_at_its_deadline_and_waits_for_no_pump_that_cannot_send():
    loop = asyncio.new_event_loop()
    idle = Outbox(loop, 4)  # before READY: no pump yet
    idle.post(("frame", 1, True))
    assert idle.drain(time.monotonic() + 5.0)
    slow = Outbox(loop, 4)
    slow.start()
    slow.post(("frame", 1, True))  # the pump never takes it
    t0 = time.monotonic()
    assert not slow.drain(t0 + 0.02) and 0.015 < time.monotonic() - t0 < 1.0
    stuck = Outbox(loop, 4)
    stuck.start()
    stuck.post(("frame", 1, True))
    stuck.sending()  # a send that does not finish: a device that stopped reading
    time.sleep(FLUSH_S * 1.5)
    t0 = time.monotonic()
    assert not stuck.drain(t0 + 5.0) and time.monotonic() - t0 < 0.005
    stuck.close()  # the pump stopped: nothing will leave
    assert stuck.drain(time.monotonic() + 5.0)
    loop.close()


def test_a_device_that_takes_its_frames_slowly_does_not_pace_the_forwards():
    """A device reading just fast enough that each send takes a few milliseconds (under FLUSH_S, so never
    'stuck') would hold every tick of every session that long: a send under way longer than SLOW_SEND_S
    is not waited for, nor is any frame of an outbox whose last send took longer, until one does not."""
    loop = asyncio.new_event_loop()
    box = Outbox(loop, 4)
    box.start()
    box.post(("frame", 1, True))
    box.sending()
    time.sleep(SLOW_SEND_S * 2)
    t0 = time.monotonic()
    assert not box.drain(t0 + 0.5) and time.monotonic() - t0 < 0.25  # under way too long already
    box.sent()  # a slow send
    box.post(("frame", 1, False))  # no pump takes it: waiting would last until the deadline
    t0 = time.monotonic()
    assert not box.drain(t0 + 0.5) and time.monotonic() - t0 < 0.25  # not waited for at all
    box.sending()
    box.sent()  # a quick one: waited for again
    box.post(("frame", 1, False))

    def pump():
        time.sleep(0.001)
        box.sending()
        box.sent()

    threading.Thread(target=pump).start()
    assert box.drain(time.monotonic() + 1.0)
    loop.close()
