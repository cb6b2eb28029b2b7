"""``python -m cambrian_core.train CONFIG ...``: the entry the launchers start (torchrun, deepspeed)."""

import sys

from cambrian_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
