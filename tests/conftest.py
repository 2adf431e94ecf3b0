"""Suite-wide settings. One torch thread per test process: the suite runs on 2 cores next to server
subprocesses it starts, and oversubscribed intra-op threads make tiny models tens of times slower."""

import torch

torch.set_num_threads(1)
