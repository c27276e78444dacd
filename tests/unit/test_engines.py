"""What `parallama up` runs for each kind of instance, and how the gateway then sees it."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from parallama.cli import build_parser
from parallama.launch.engines import InstanceSettings, launch, template
from parallama.launch.up import plan

README = Path(__file__).parents[2] / "README.md"


def instance(**fields: Any) -> InstanceSettings:
    return InstanceSettings.model_validate({"port": 11434, **fields})


def test_ollama_gets_its_address_and_concurrency_from_its_environment() -> None:
    started = launch(
        instance(num_parallel=4, keep_alive="-1", max_loaded_models=2, gpus="1", weight=2),
        0,
        11440,
    )
    assert started.name == "ollama-0"
    assert started.argv == ("ollama", "serve")
    assert started.env == {
        "OLLAMA_HOST": "127.0.0.1:11440",
        "OLLAMA_NUM_PARALLEL": "4",
        "OLLAMA_KEEP_ALIVE": "-1",
        "OLLAMA_MAX_LOADED_MODELS": "2",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    assert started.backend.url == "http://127.0.0.1:11440"
    assert (started.backend.kind, started.backend.slots, started.backend.weight) == (
        "ollama",
        4,
        2,
    )
    assert started.ready_path == b"/api/version"


def test_a_command_stands_in_for_the_engine_with_placeholders_filled() -> None:
    started = launch(
        instance(name="fake", command=["my-ollama", "--listen={host}:{port}"], args=["-v"]),
        3,
        9000,
    )
    assert started.argv == ("my-ollama", "--listen=127.0.0.1:9000", "-v")
    assert started.env["OLLAMA_HOST"] == "127.0.0.1:9000"  # still Ollama's settings
    assert started.name == "fake"


def test_llama_cpp_python_serves_one_request_at_a_time_and_is_never_interrupted() -> None:
    started = launch(
        instance(engine="llama-cpp", model="/m/SmolLM2.gguf", threads=1, ctx=2048), 1, 8001
    )
    assert started.argv[:3] == (sys.executable, "-m", "llama_cpp.server")
    argv = " ".join(started.argv)
    assert "--model /m/SmolLM2.gguf --model_alias SmolLM2" in argv
    assert "--interrupt_requests False" in argv
    assert "--n_threads 1 --n_threads_batch 1 --n_ctx 2048" in argv  # prompts too
    assert started.env == {}
    assert (started.backend.kind, started.backend.slots) == ("openai", 1)
    assert started.ready_path == b"/v1/models"


def test_llama_server_slots_are_its_parallel_setting() -> None:
    started = launch(
        instance(engine="llama-server", model="m.gguf", alias="m:1b", parallel=4), 0, 8080
    )
    assert started.argv[0] == "llama-server"
    assert "--parallel 4" in " ".join(started.argv)
    assert "--alias m:1b" in " ".join(started.argv)
    assert started.backend.slots == 4


def test_a_command_instance_says_which_api_it_speaks() -> None:
    started = launch(instance(engine="command", command=["vllm"], dialect="openai"), 0, 8000)
    assert (started.backend.kind, started.env) == ("openai", {})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"engine": "llama-cpp"}, "needs model"),
        ({"engine": "command"}, "needs command"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"engine": "vllm"}, "Input should be"),
        ({"num_parallel": 0}, "greater than or equal to 1"),
        ({"threads_": 2}, "Extra inputs"),
    ],
)
def test_incomplete_instances_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        instance(**fields)


def test_the_template_spreads_ports_and_gpus_as_the_seed_script_does() -> None:
    instances = template("ollama", 3, 11434, gpus=2, num_parallel=4, keep_alive=None)
    assert [i.port for i in instances] == [11434, 11435, 11436]
    assert [i.gpus for i in instances] == ["0", "1", "0"]
    assert all(i.num_parallel == 4 and i.keep_alive is None for i in instances)
    assert [i.port for i in template("sim", 2, 0)] == [0, 0]  # free ports, chosen at start


def readme_block(first_line: str) -> str:
    blocks: list[str] = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    return next(block for block in blocks if block.startswith(first_line))


def test_the_readme_example_plans_what_it_says(tmp_path: Path) -> None:
    path = tmp_path / "up.toml"
    path.write_text(readme_block("# up.toml"))
    settings, launches = plan(build_parser().parse_args(["up", "--config", str(path)]), env={})
    assert [(item.name, item.argv[0], item.dialect, item.backend.slots) for item in launches] == [
        ("gpu0", "ollama", "ollama", 4),
        ("llama-cpp-1", sys.executable, "openai", 1),
        ("llama-server-2", "llama-server", "openai", 4),
        ("command-3", "vllm", "openai", 16),
    ]
    assert launches[3].argv[-1] == "8000"
    assert [b.url for b in settings.backends] == [item.url for item in launches]
    assert settings.routing == "model-affinity"


def test_every_instance_setting_is_documented() -> None:
    readme = README.read_text()
    for name in InstanceSettings.model_fields:
        assert f"`{name}`" in readme, f"README does not document instance `{name}`"
