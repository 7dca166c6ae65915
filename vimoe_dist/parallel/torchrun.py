"""torchrun (`torch.distributed.run`, same arguments), ending on a stop signal with one line and exit 128+N.

On SIGINT or SIGTERM torchrun's agent sends the same signal to its workers, waits for them (30 s, then SIGKILL),
and then raises `SignalException` out of its `main`, which Python prints as a 30-line traceback. This module runs
torchrun's own `main` and turns that exception into the exit status a shell expects from a signal, silently:
`vimoe launch`, which sent the signal, says what happened in one line.

    python -m vimoe_dist.parallel.torchrun --standalone --nproc-per-node=2 -m vimoe_dist train --config ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
