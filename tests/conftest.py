"""Suite-wide settings. One torch thread per test process: the suite runs on 2 cores next to server
subprocesses it starts, and oversubscribed intra-op threads make tiny models tens of times slower."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The async tests run on asyncio, the loop the server runs on; session-wide so module fixtures can use it."""
    return "asyncio"
