"""imattrain: train, evaluate and predict from imatdata's clean Parquet shards."""

import os as _os
import sys as _sys

# Idle OpenMP threads sleep instead of spinning: `OMP_WAIT_POLICY=PASSIVE`, set here, on the
# import path of every entry point (the `imattrain` command, `python -m imattrain` and library
# callers such as `from imattrain.engine import train`), because the OpenMP runtime reads it
# once, when torch loads it, and every imattrain module that needs torch imports it after
# this. torch's libgomp otherwise spins between operations, which on a machine running
# anything else (loader workers, other jobs) burns the cores its own threads need:
# ResNet-18 at 64 px on 2 shared cores ran 2-4x faster passive (README, "CPU threads").
# A value the user set wins; when torch is already loaded it is too late for this process,
# and the environment (which child processes inherit) is left as the user had it.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
