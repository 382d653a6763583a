"""End a torchrun worker that has finished its work without the interpreter's teardown.

Under load, a worker that has written every result sometimes aborts while the interpreter shuts down
("terminate called without an active exception", SIGABRT: a C++ background thread destroyed during
teardown). torchrun then reports the run as failed although every result is on disk. Leaving with
``os._exit(0)`` after flushing skips that teardown. A worker that fails earlier still raises, and
torchrun reports it as before.
"""

import os
import sys


def exit_cleanly() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
