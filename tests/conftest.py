"""One thread per test process. CI has 2 cores, and several tests start more processes (DDP
workers, the CLI, benchmark children): with torch's default of one thread per core they
oversubscribe the machine and the suite runs several times slower.

A user's scheme and models are registered (tests/user_scheme.py), as `revnets --import` would:
the tests over the registry must pick them up without naming them."""
import importlib
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; child processes inherit it

import torch  # noqa: E402

importlib.import_module("user_scheme")  # registers "user-tanh", "user-tanh-6", "hamiltonian-tiny"

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
