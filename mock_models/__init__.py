"""mock_models: deterministic OpenAI-compatible mock LLMs over real HTTP, for offline runs, tests and lessons.

    python3 -m mock_models --port 0          # serve; the first line printed is the base URL
    python3 -m mock_models demo              # selfmoa's three methods against the mock, step by step

    with MockServer(latency=0.1) as server:  # in Python: a context manager
        ... server.base_url ... server.requests ...

The models (``generalist``, ``coder``, ``mathematician``, ``generalist-2``, and ``echo``) answer the
questions of a small task world (``mock_models.tasks``: MATH, CRUX, MMLU, with ground truth) with
per-domain accuracies calibrated on the paper's Table 3, and act as voting aggregators when their system
message holds numbered references (``mock_models.models``). The server (``mock_models.server``) speaks the
wire format of spec/wire.md, with latency and fault injection. This package shares no code with selfmoa.
"""

from mock_models.models import MODELS
from mock_models.server import FAULTS, MockServer, serve
from mock_models.tasks import DOMAINS, Task, extract_answer, find_task, is_correct, make_tasks

__all__ = ["DOMAINS", "FAULTS", "MODELS", "MockServer", "Task", "extract_answer", "find_task", "is_correct",
           "make_tasks", "serve"]
