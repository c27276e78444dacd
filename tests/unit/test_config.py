"""Settings of `parallama serve`: file, environment and flags, and the errors a user sees."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from parallama import config
from parallama.cli import build_parser
from parallama.config import GatewaySettings
from parallama.errors import ConfigError
from parallama.gateway.app import Gateway
from parallama.sim.server import SimServer
from tests.docs import documentation
from tests.simhelpers import make_config


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(argv)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "parallama.toml"
    path.write_text(text)
    return path


FILE = """
port = 12000
max_queue = 10
queue_timeout = 5
discipline = "fair"

[[backends]]
url = "http://127.0.0.1:11434/"
slots = 4
weight = 2
models = ["qwen2.5:7b"]

[[backends]]
url = "http://gpu-2:11434"
"""


def test_file_settings_with_defaults_for_the_rest(tmp_path: Path) -> None:
    settings = config.from_args(parse("--config", str(write(tmp_path, FILE))), env={})
    assert settings.port == 12000
    assert settings.host == "127.0.0.1"  # never exposed unless asked
    first, second = settings.backends
    assert first.url == "http://127.0.0.1:11434"
    assert (settings.slots_of(first), first.weight, first.models) == (
        4,
        2.0,
        frozenset({"qwen2.5:7b"}),
    )
    assert (settings.slots_of(second), second.weight, second.models) == (1, 1.0, None)
    assert settings.scheduler.discipline == "fair"
    assert settings.scheduler.max_queue == 10


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    env = {"PARALLAMA_PORT": "13000", "PARALLAMA_MAX_QUEUE": "20", "PARALLAMA_CONFIG": str(path)}
    settings = config.from_args(parse("--max-queue", "30", "--no-log-requests"), env=env)
    assert settings.port == 13000
    assert settings.max_queue == 30
    assert settings.log_requests is False
    assert len(settings.backends) == 2  # from the file named by PARALLAMA_CONFIG


def test_backend_flags_and_environment_replace_the_files_backends(tmp_path: Path) -> None:
    path = str(write(tmp_path, FILE))
    env = {"PARALLAMA_BACKENDS": "http://a:1, http://b:2"}
    from_env = config.from_args(parse("--config", path), env=env)
    assert [b.url for b in from_env.backends] == ["http://a:1", "http://b:2"]
    from_flags = config.from_args(parse("--config", path, "--backend", "http://c:3"), env=env)
    assert [b.url for b in from_flags.backends] == ["http://c:3"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('port = 11500\n[[backends]]\nurl = "ftp://x"', "backends.0.url: 'ftp://x' is not an http"),
        ('[[backends]]\nurl = "http://x"\nslots = 0', "backends.0.slots: slots are a whole number"),
        ('prot = 1\n[[backends]]\nurl = "http://x"', "prot: unknown setting"),
        ('discipline = "lifo"\n[[backends]]\nurl = "http://x"', "discipline: Input should be"),
        ("port = 11500", "backends: Field required"),
        ("port = ", "not valid TOML"),
    ],
)
def test_bad_settings_say_which_and_why(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.from_args(parse("--config", str(write(tmp_path, text))), env={})
    assert expected in str(caught.value)


def test_bad_environment_value_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port: Input should be a valid integer"):
        config.from_args(parse("--backend", "http://x"), env={"PARALLAMA_PORT": "eleven"})


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.from_args(parse("--config", str(tmp_path / "absent.toml")), env={})


def test_every_setting_has_a_flag_an_environment_name_and_a_readme_entry() -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    help_text = parser.format_help()
    readme = documentation()
    for name in GatewaySettings.model_fields:
        if name not in ("backends", "models"):  # tables: in the file only
            assert f"--{name.replace('_', '-')}" in help_text
            assert config.env_name(name) in help_text
        assert f"`{name}`" in readme, f"the docs do not document `{name}`"
    for name in config.BackendSettings.model_fields:
        assert f"`{name}`" in readme, f"the docs do not document backend `{name}`"
    for name in config.ModelSettings.model_fields:
        assert f"`{name}`" in readme, f"the docs do not document model `{name}`"


def test_model_tables_make_aliases_and_per_model_routing(tmp_path: Path) -> None:
    path = tmp_path / "parallama.toml"
    path.write_text(
        'routing = "least-loaded"\n'
        '[[backends]]\nurl = "http://127.0.0.1:11434"\nmodels = ["qwen2.5"]\n'
        '[models."gpt-4o"]\ntarget = "qwen2.5"\nrouting = "session-affinity"\n'
        '[models.llama3]\nrouting = "model-affinity"\n'
    )
    settings = config.load(path, env={})
    assert settings.aliases == {"gpt-4o:latest": "qwen2.5:latest"}
    assert settings.backends[0].models == frozenset({"qwen2.5:latest"})
    assert dict(settings.scheduler.routing_by_model) == {
        "qwen2.5:latest": "session-affinity",
        "llama3:latest": "model-affinity",
    }
    path.write_text('[[backends]]\nurl = "http://h:1"\n[models.x]\nrouting = "random"\n')
    with pytest.raises(ConfigError, match=r"models\.x\.routing"):
        config.load(path, env={})


def test_every_route_a_help_text_names_exists() -> None:
    """`--admin-token` once named /parallama/drain, which never existed."""
    parser = build_parser()
    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    helps = "\n".join(sub.format_help() for sub in commands.choices.values())
    # Paths that start a word: not files such as ~/.local/state/parallama/logs.
    route = r"(?<![\w/.$~])(/(?:parallama|api|v1|_sim)/[\w/]*\w|/metrics)"
    named = set(re.findall(route, helps))
    settings = GatewaySettings.model_validate({"backends": [{"url": "http://127.0.0.1:1"}]})
    sim = SimServer(make_config(), 0).make_app()
    routes = {r.resource.canonical for r in sim.router.routes() if r.resource}
    routes |= set(Gateway(settings).routes)
    assert named, "the help texts name no route: the pattern is wrong"
    assert named <= routes


def test_allowed_hosts_come_as_a_list_or_comma_separated_and_without_ports() -> None:
    from_env = config.load(
        env={
            "PARALLAMA_BACKENDS": "http://127.0.0.1:1",
            "PARALLAMA_ALLOWED_HOSTS": "A.example, .corp.example ,llm.example:8443",
        }
    )
    assert from_env.allowed_hosts == ("a.example", ".corp.example", "llm.example")


def test_a_model_pattern_maps_the_names_it_matches_and_only_to_a_target() -> None:
    backends = [{"url": "http://127.0.0.1:11434"}]
    models = {"claude-*": {"target": "qwen2.5:7b"}, "qwen2.5:7b": {"keep_alive": -1}}
    settings = GatewaySettings.model_validate({"backends": backends, "models": models})
    haiku = settings.model_entry("claude-haiku-4-5:latest")
    assert haiku is not None
    assert haiku.target == "qwen2.5:7b"
    assert settings.model_entry("gpt-4o:latest") is None
    assert settings.aliases == {}  # a pattern names no one model to list
    for wrong in ({"warm": True, "target": "qwen2.5:7b"}, {"keep_alive": -1}):
        with pytest.raises(ValueError, match="a pattern names no one model"):
            GatewaySettings.model_validate({"backends": backends, "models": {"claude-*": wrong}})
