"""HeldSignals: Ctrl-C and SIGTERM held where an exception would do harm, never lost, and not held forever."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fmnist.signals import HeldSignals


def test_a_held_ctrl_c_is_raised_when_an_error_ends_the_block():
    """A Ctrl-C held through a write that then fails is not lost: the program stops as interrupted (KILLED runs,
    exit 130), with the error as the interrupt's context."""
    with pytest.raises(KeyboardInterrupt) as stopped:
        with HeldSignals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs here and holds the signal
            raise ConnectionError("the server went away")
    assert isinstance(stopped.value.__context__, ConnectionError)


def test_a_second_ctrl_c_while_one_is_held_stops_at_once():
    """A hold can last long (a hung server, a trial's epoch in a thread): the second Ctrl-C does not wait."""
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with HeldSignals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            reached.append("after the first")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            reached.append("after the second")
    assert reached == ["after the first"]


def test_a_held_ctrl_c_is_held_even_where_its_note_cannot_be_written():
    """The first Ctrl-C's note goes to stderr; with stderr closed (or a broken pipe) writing it must not turn the
    held signal into an OSError in the middle of the block."""
    code = textwrap.dedent("""
        import os, signal, time
        from fmnist.signals import HeldSignals
        os.close(2)
        try:
            with HeldSignals():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
                print("held", flush=True)
        except KeyboardInterrupt:
            print("raised at the end", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["held", "raised at the end"], out.stdout
