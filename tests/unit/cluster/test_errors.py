"""one_line: worker errors on one line that still name their cause."""

from cluster.control.errors import one_line


def test_keeps_the_first_line_and_the_traceback_cause():
    text = (
        "The actor died because of an error raised in its creation task, ray::DecodeActor.__init__()\n"
        '  File "decode_worker/actor.py", line 40, in __init__\n'
        "    self.worker = build(...)\n"
        "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/no-such-model/config.json'\n"
    )
    assert one_line(RuntimeError(text)) == (
        "The actor died because of an error raised in its creation task, ray::DecodeActor.__init__() ... "
        "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/no-such-model/config.json'"
    )


def test_drops_advice_that_names_no_exception():
    e = RuntimeError("worker lost\n\nThis can happen when the node was preempted.\nSee the docs.")
    assert one_line(e) == "worker lost"


def test_empty_message_gives_the_type():
    assert one_line(ConnectionResetError()) == "ConnectionResetError"
    assert one_line("") == "unknown error"
