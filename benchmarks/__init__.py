"""deepserve's benchmark suite: ``python -m benchmarks.run --out benchmarks/results`` (``make bench``).

Modules: ``loadgen`` (asynchronous loopback load generator), ``results`` (markdown + JSON + PNG writer),
``servers`` / ``server_main`` / ``echo`` (uvicorn subprocesses under test), ``models`` (random-weight
checkpoints exported into a temporary repository), one module per scenario, and ``run`` (the CLI).
"""
