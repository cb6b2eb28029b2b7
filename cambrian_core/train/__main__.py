"""``python -m cambrian_core.train CONFIG ...``: the entry the launchers start (torchrun, deepspeed)."""

import logging
import os
import sys

from cambrian_core.cli import main

if __name__ == "__main__":
    code = main(["train", *sys.argv[1:]])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One process of a launched group, its work done and its process group destroyed: leave without the
        # interpreter's teardown, where gloo's threads were seen to abort a finished rank now and then
        # ("terminate called without an active exception", exit -6), failing a run that had succeeded.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))
    sys.exit(code)
