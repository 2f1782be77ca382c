"""One thread per test process. CI has 2 cores, and several tests start more processes (DDP
workers, the CLI, benchmark children): with torch's default of one thread per core they
oversubscribe the machine and the suite runs several times slower. Decoded image folders are
cached in a temporary directory, not in the user's cache."""
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; child processes inherit it

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir():
    with tempfile.TemporaryDirectory(prefix="revnets-cache-") as cache:
        os.environ["REVNETS_CACHE"] = cache  # child processes inherit it
        yield
    del os.environ["REVNETS_CACHE"]
