"""Reading how busy an engine says it is: llama.cpp server's /slots, vLLM's /metrics."""

from __future__ import annotations

import orjson

from parallama.core.backends import Backend
from parallama.protocol.occupancy import busy_slots, vllm_busy
from tests.unit.schedulers import M, make

LLAMA_SERVER_SLOTS = orjson.dumps(
    [
        {"id": 0, "n_ctx": 4096, "speculative": False, "is_processing": True, "id_task": 7},
        {"id": 1, "n_ctx": 4096, "speculative": False, "is_processing": False},
        {"id": 2, "n_ctx": 4096, "speculative": False, "is_processing": True},
    ]
)
VLLM_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 2.0
vllm:num_requests_waiting_by_reason{model_name="Qwen/Qwen2.5-7B-Instruct",reason="capacity"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 0.4
"""


def test_llama_servers_slots_page_counts_the_slots_processing() -> None:
    assert busy_slots(LLAMA_SERVER_SLOTS) == 2
    older = orjson.dumps([{"id": 0, "state": 1}, {"id": 1, "state": 0}])
    assert busy_slots(older) == 1
    assert busy_slots(b"[]") == 0  # no model loaded (the emulator)
    for other in (b"", b"{}", b"not json", b'{"error": {"code": 501}}', b"[1, 2]"):
        assert busy_slots(other) is None


def test_vllms_metrics_count_running_and_waiting_requests_only() -> None:
    assert vllm_busy(VLLM_METRICS) == 5
    assert vllm_busy(b"# just comments\nother_metric 4\n") is None
    for odd in (b"1e999", b"NaN", b"-1.0", b"+Inf"):  # no number a gauge of requests holds
        assert vllm_busy(b"vllm:num_requests_running " + odd + b"\n") is None


def test_requests_from_outside_the_gateway_take_slots_until_the_next_look() -> None:
    a, b = Backend("a", slots=2), Backend("b", slots=2)
    s = make(a, b)
    ours = s.submit(M)
    assert ours.backend is a
    s.observe_busy("a", 2)  # ours, and one another client sent it directly
    assert a.outside == 1
    assert s.submit(M).backend is b  # a looks fuller than b: 2 of 2 against 0 of 2
    assert s.submit(M).backend is b
    waiting = s.submit(M)
    assert waiting.queued  # a's last slot is the outside client's
    s.observe_busy("a", 1)  # the outside request ended: the slot is ours again
    assert a.outside == 0 and waiting.backend is a
    s.observe_busy("b", 4)
    assert b.outside == 2
    s.observe_busy("b", None)  # it could not tell: nothing is kept from an old look
    assert b.outside == 0
