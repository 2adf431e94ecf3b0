"""schemathesis over the OpenAPI document: every operation, generated requests that fit the schema and requests
that break it (its coverage and fuzzing phases), against the app in this process (uvicorn in a thread, a real
loopback socket). No answer may be a server error, and every answer must match its documented status, content
type, headers and schema; a request that breaks the schema must be refused.

Bounded by examples per operation (``SCHEMATHESIS_EXAMPLES``, default 25) and by small generation caps on the
server, so it takes about a minute on 2 cores. Path parameters name real models, so requests reach the models
rather than stopping at 404, except model control, which names a model the repository does not have (unloading
the models would leave the other operations nothing to reach). A 504 is not counted as a server error: it is the documented answer to a
deadline too short to meet, and the fuzzer sends ``x-request-timeout-ms: 5e-324``.

``positive_data_acceptance`` (a schema-valid request must not be refused) is on, except for exactly the
operations where the document cannot say what is valid: tensor infer and predictions (which tensors, shapes and
images a model takes is the model's, not the document's: "input 'x': 3 values for shape [1, 1, 8, 8]" is a right
answer to a schema-valid body), model load (its ``parameters.config`` is a JSON document inside a string,
which JSON Schema cannot constrain) and text generation (rules across parameters, such as min_new_tokens <=
max_new_tokens and num_return_sequences <= num_beams, and the model's own caps on max_new_tokens, beams x n and
prompt length). Everything else is checked; this check found that the timeout header's document lacked its
maximum and that integer parameters refused 16.0, which JSON (and the document) count as an integer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import uvicorn

from deepserve.serve.app import create_app
from tests.artifacts import make_charlm_artifact, make_classifier_artifact, make_seq2seq_artifact
from tests.servers import free_port

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))
CAPS = {"max_new_tokens": 16, "max_beams_x_n": 4, "max_prompt_length": 64}
"""Generation caps: fuzzed requests asking for more are refused (400), so none runs long."""
CONFIG = """
seed = 1
workers = 1
suppress-health-check = ["all"]
[generation]
max-examples = {examples}
[phases.examples]
enabled = false
[phases.stateful]
enabled = false

[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "504"]

[[operations]]
include-path-regex = "^/v2/repository/models/.*/load$"
parameters = {{ "path.model" = "not-a-model" }}
checks = {{ positive_data_acceptance = {{ enabled = false }} }}

[[operations]]
include-path-regex = "^/v2/repository/models/"
parameters = {{ "path.model" = "not-a-model" }}

[[operations]]
include-path-regex = "generate"
parameters = {{ "path.model" = "tiny-charlm", "path.version" = "1" }}
checks = {{ positive_data_acceptance = {{ enabled = false }} }}

[[operations]]
include-path = "/v1/completions"
parameters = {{ "body.model" = "tiny-charlm" }}
checks = {{ positive_data_acceptance = {{ enabled = false }} }}

[[operations]]
include-path-regex = "/infer$|^/predictions/"
parameters = {{ "path.model" = "tiny-cnn", "path.version" = "1" }}
checks = {{ positive_data_acceptance = {{ enabled = false }} }}

[[operations]]
include-path-regex = "^/v2/models/\\\\{{model\\\\}}"
exclude-path-regex = "generate|infer"
parameters = {{ "path.model" = "tiny-cnn", "path.version" = "1" }}
"""


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-repo")
    make_classifier_artifact(root, "tiny-cnn", quantize=False)
    make_charlm_artifact(root, "tiny-charlm")
    make_seq2seq_artifact(root, "tiny-seq2seq")
    app = create_app(root, device="cpu", settings=CAPS, max_body_bytes=1_000_000)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):  # bounded: startup loads and warms the models
        if server.started or not thread.is_alive():
            break
        time.sleep(0.05)
    assert server.started, "server did not start"
    yield f"http://127.0.0.1:{config.port}"
    server.should_exit = True
    thread.join(30)


def test_every_operation_answers_as_documented(base_url, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(examples=EXAMPLES))
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{base_url}/openapi.json",
         "--phases", "coverage,fuzzing", "--no-color", "--wait-for-schema", "30"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-12000:]
    total = report.split("Operations:", 1)[1].split("selected / ", 1)[1].split(" total", 1)[0]
    assert f"Operations:       {total} selected / {total} total" in report, report[-3000:]  # every operation ran
    assert f"Tested: {total}" in report and "failures" not in report.rsplit("SUMMARY", 1)[-1], report[-3000:]
