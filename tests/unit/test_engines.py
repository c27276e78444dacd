"""What `parallama up` runs for each kind of instance, and how the gateway then sees it."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from parallama.cli import build_parser
from parallama.errors import ConfigError
from parallama.launch.autoscale import ScalePolicy
from parallama.launch.engines import (
    InstanceSettings,
    demo_real,
    has_amx,
    launch,
    template,
)
from parallama.launch.up import _instances, default_log_dir, plan
from tests.docs import documentation


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
    assert started.backend.max_loaded_models == 2  # the room model affinity respects
    assert launch(instance(max_loaded_models=0), 0, 11440).backend.max_loaded_models is None
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


def test_llama_server_gets_its_slots_cache_and_room_for_connections() -> None:
    started = launch(
        instance(engine="llama-server", model="/m/SmolLM2.gguf", threads=1, ctx=8192, parallel=2,
                 cache_ram=1024),
        1,
        8001,
        amx=False,
        llama_server="/opt/llama/llama-server",
    )  # fmt: skip
    assert started.argv[0] == "/opt/llama/llama-server"
    argv = " ".join(started.argv)
    assert "--model /m/SmolLM2.gguf --alias SmolLM2" in argv
    assert "--host 127.0.0.1 --port 8001 --parallel 2" in argv
    assert "--threads 1 --threads-batch 1 --ctx-size 8192 --cache-ram 1024" in argv  # prompts too
    # Two connections a slot (one busy, one idle in the gateway's pool), and room for probes and
    # outside clients: else a connection waits unread for one of its few HTTP threads.
    assert "--threads-http 12 --metrics --slots --no-webui" in argv
    assert started.env == {}
    assert (started.backend.kind, started.backend.slots) == ("openai", 2)
    assert (started.backend.prompt_cache, started.backend.prompt_cache_ram) == (
        "llama-server",
        1024,
    )
    assert started.ready_path == b"/v1/models"


def test_llama_server_has_its_own_default_slots_unless_told() -> None:
    default = launch(instance(engine="llama-server", model="m.gguf"), 0, 8080)
    assert default.argv[0] == "llama-server"
    assert "--parallel 4" in " ".join(default.argv)  # its own `-np -1` means four
    assert default.backend.slots == 4
    assert default.backend.prompt_cache_ram == 8192  # llama-server's own default
    started = launch(
        instance(engine="llama-server", model="m.gguf", alias="m:1b", parallel=8, threads_http=40),
        0,
        8080,
    )
    assert "--parallel 8" in " ".join(started.argv)
    assert "--threads-http 40" in " ".join(started.argv)
    assert "--alias m:1b" in " ".join(started.argv)
    assert started.backend.slots == 8


@pytest.mark.parametrize(
    ("amx", "repack", "repacks"),
    [
        (False, None, True),  # llama.cpp's default
        (True, None, False),  # where some builds crash in the AMX buffers
        (True, True, True),  # asked for all the same
        (False, False, False),
    ],
)
def test_llama_server_repacks_weights_unless_the_cpu_has_amx_or_told_not_to(
    amx: bool, repack: bool | None, repacks: bool
) -> None:
    settings = {"model": "m.gguf", "repack": repack}
    binary = launch(instance(engine="llama-server", **settings), 0, 8080, amx=amx).argv
    assert ("--no-repack" not in binary) == repacks


def test_amx_is_read_from_the_cpus_flags() -> None:
    sapphire_rapids = "processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n"
    assert has_amx(sapphire_rapids)
    assert not has_amx("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not has_amx("")


def test_each_instance_writes_its_output_to_a_file_named_after_it(tmp_path: Path) -> None:
    started = launch(instance(name="gpu0"), 0, 11434, log_dir=tmp_path)
    assert started.log_file == tmp_path / "gpu0.log"
    odd = launch(instance(name="../a b/c"), 0, 11434, log_dir=tmp_path)
    assert odd.log_file is not None and odd.log_file.parent == tmp_path
    assert launch(instance(), 0, 11434).log_file is None  # the supervisor's own use: no file


def test_engine_logs_go_to_the_users_state_directory_unless_told() -> None:
    assert default_log_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == Path("/s/parallama/logs")
    home = Path("/h/.local/state/parallama/logs")
    assert default_log_dir({"HOME": "/h"}) == home
    assert default_log_dir({"XDG_STATE_HOME": "relative", "HOME": "/h"}) == home
    args = build_parser().parse_args(["up", "--instances", "1", "--log-dir", "/var/log/p"])
    _, launches = plan(args, env={})
    assert launches[0].log_file == Path("/var/log/p/ollama-0.log")


def test_a_command_instance_says_which_api_it_speaks() -> None:
    started = launch(instance(engine="command", command=["vllm"], dialect="openai"), 0, 8000)
    assert (started.backend.kind, started.env) == ("openai", {})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"engine": "llama-server"}, "needs model"),
        ({"engine": "llama-cpp"}, "Input should be"),
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


def test_the_short_form_starts_from_ollamas_port_unless_told() -> None:
    parse = build_parser().parse_args
    assert [i.port for i in _instances(parse(["up", "--instances", "2"]), [], "")] == [
        11434,
        11435,
    ]
    given = _instances(parse(["up", "--instances", "2", "--base-port", "9000"]), [], "")
    assert [i.port for i in given] == [9000, 9001]


def test_an_autoscaled_table_is_a_group_of_max_engines_on_consecutive_ports() -> None:
    args = build_parser().parse_args(
        ["up", "--engine", "sim", "--autoscale", "1:3", "--base-port", "9000", "--log-dir", "/l"]
    )
    settings, launches = plan(args, env={})
    assert [(item.name, item.group, item.port) for item in launches] == [
        ("sim-0.1", "sim-0", 9000),
        ("sim-0.2", "sim-0", 9001),
        ("sim-0.3", "sim-0", 9002),
    ]
    assert {item.autoscale for item in launches} == {ScalePolicy(min=1, max=3)}
    assert [b.url for b in settings.backends] == [item.url for item in launches]
    assert launches[1].log_file == Path("/l/sim-0.2.log")
    single = plan(build_parser().parse_args(["up", "--instances", "1"]), env={})[1][0]
    assert (single.name, single.group, single.autoscale) == ("ollama-0", "ollama-0", None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--autoscale", "3"], "MIN:MAX, such as 0:4, not '3'"),
        (["--autoscale", "2:1"], "min <= max"),
        (["--autoscale", "0:0"], "greater than or equal to 1"),
        (["--autoscale", "0:2", "--instances", "2"], "give one of them"),
        (["--autoscale", "0:3", "--base-port", "65534"], "go past port 65535"),
        (["--autoscale", "0:3", "--gpus", "2"], "--gpus spreads --instances"),
    ],
)
def test_bad_autoscaling_is_a_clear_error(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(build_parser().parse_args(["up", *flags]), env={})


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (  # a group's second engine on the port of another instance
            '[[instances]]\nengine = "sim"\nport = 9001\n'
            '[[instances]]\nengine = "sim"\nname = "g"\nport = 9000\nautoscale = { max = 2 }',
            "two engines or backends on one address: http://127.0.0.1:9001",
        ),
        (  # an instance that is also listed as a backend
            '[[instances]]\nengine = "sim"\nport = 9000\n'
            '[[backends]]\nurl = "http://127.0.0.1:9000"',
            "one address: http://127.0.0.1:9000",
        ),
        (  # a table and a group of one name
            '[[instances]]\nengine = "sim"\nname = "g"\nport = 0\n'
            '[[instances]]\nengine = "sim"\nname = "g"\nport = 0\nautoscale = { max = 2 }',
            "instance names must differ: g, g.1, g.2",
        ),
    ],
)
def test_engines_that_would_be_one_backend_are_refused(
    tmp_path: Path, tables: str, message: str
) -> None:
    path = tmp_path / "up.toml"
    path.write_text(tables)
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan(build_parser().parse_args(["up", "--config", str(path)]), env={})


def test_the_real_demo_takes_free_ports_unless_a_base_port_is_given() -> None:
    """`--port 0` is the gateway's; the demo's engines must not then sit on Ollama's port."""
    instances = demo_real(0, "/m/SmolLM2.gguf")
    assert [(i.engine, i.port, i.parallel, i.threads) for i in instances] == [
        ("llama-server", 0, 2, 1),
        ("llama-server", 0, 2, 1),
    ]
    assert [i.port for i in demo_real(9000, "/m/SmolLM2.gguf")] == [9000, 9001]


LLAMA_SERVER = shutil.which("true") or "/bin/true"  # found, not built: these only plan


def up_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["up", "--llama-server", LLAMA_SERVER, *flags])


def readme_block(first_line: str) -> str:
    blocks: list[str] = re.findall(r"```toml\n(.*?)```", documentation(), re.S)
    return next(block for block in blocks if block.startswith(first_line))


def test_the_readme_autoscaling_example_is_a_group_of_two(tmp_path: Path) -> None:
    path = tmp_path / "up.toml"
    path.write_text(readme_block('[[instances]]\nengine = "llama-server"'))
    _, launches = plan(up_args("--config", str(path)), env={})
    assert [item.name for item in launches] == ["llama-server-0.1", "llama-server-0.2"]
    assert launches[0].autoscale == ScalePolicy(
        min=0, max=2, wait_up=2, sustain=3, idle_after=300, cooldown=10
    )


def test_the_readme_example_plans_what_it_says(tmp_path: Path) -> None:
    path = tmp_path / "up.toml"
    path.write_text(readme_block("# up.toml"))
    settings, launches = plan(up_args("--config", str(path)), env={})
    assert [(item.name, item.argv[0], item.dialect, item.backend.slots) for item in launches] == [
        ("gpu0", "ollama", "ollama", 4),
        ("llama-server-1", LLAMA_SERVER, "openai", 4),
        ("command-2", "vllm", "openai", 16),
    ]
    assert launches[2].argv[-1] == "8000"
    assert [b.url for b in settings.backends] == [item.url for item in launches]
    assert settings.routing == "model-affinity"


def test_every_instance_setting_is_documented() -> None:
    docs = documentation()
    for name in InstanceSettings.model_fields:
        assert f"`{name}`" in docs, f"the docs do not document instance `{name}`"
