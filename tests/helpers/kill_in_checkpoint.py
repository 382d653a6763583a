"""Run ``senseflow train`` and SIGKILL the process in the middle of writing checkpoint ``--at``.

``python -m tests.helpers.kill_in_checkpoint WHERE STEP -- <senseflow train args>``

WHERE is where inside the checkpoint write the kill lands:
  ``weights``  half of the first network's safetensors file written (into ``step_N.tmp``)
  ``renamed``  ``step_N.tmp`` renamed to ``step_N`` but ``latest`` not yet updated
A real ``kill -9`` of the process itself: no Python cleanup, no ``finally``, open files as they are.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    where, step = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1:]
    import senseflow.train.checkpoint as ck

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "weights":
        real_save_file = ck.save_file

        def save_file(tensors, filename, metadata=None):
            if f"step_{step:08d}.tmp" in str(filename):
                real_save_file(tensors, filename, metadata=metadata)
                with open(filename, "r+b") as fh:  # leave half a file behind, as a kill mid-write does
                    fh.truncate(os.path.getsize(filename) // 2)
                kill()
            return real_save_file(tensors, filename, metadata=metadata)
        ck.save_file = save_file
    elif where == "renamed":
        real_write = ck.write_text_atomic

        def write_text_atomic(path, text):
            if path.name == ck.LATEST and text.strip() == f"step_{step:08d}":
                kill()
            return real_write(path, text)
        ck.write_text_atomic = write_text_atomic
    else:
        raise SystemExit(f"unknown kill point {where!r}")
    from senseflow.cli import main as cli_main
    sys.exit(cli_main(args))


if __name__ == "__main__":
    main()
