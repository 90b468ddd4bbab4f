"""serve/settings.py is the one source of the serving settings: the CLI options, the
``MODELPRESS_*`` variables, ``start_server``'s keywords and the layers' objects all come
from its fields, and a bad or unknown setting is refused naming it."""

from typing import Literal, get_args, get_origin

import pytest
import typer

import compress.commands.serve as serve_command
from compress.cli import app
from serve.api.schemas import Limits
from serve.app.connections import ConnectionLimits
from serve.app.launcher import start_server
from serve.engine.core import EngineConfig
from serve.errors import ModelpressError
from serve.settings import (
    ServerSettings,
    ServeSettings,
    SettingsError,
    env_name,
    option_name,
    settings_from,
)
from tests.conftest import run_cli

FIELDS = {name: info for name, info in ServeSettings.model_fields.items()
          if name != "artifact"}  # the CLI's positional argument


def _other_value(name: str):
    """A valid value different from the field's default."""
    info = ServeSettings.model_fields[name]
    default, annotation = info.default, info.annotation
    if get_origin(annotation) is Literal:
        return next(c for c in get_args(annotation) if c != default)
    if annotation is bool:
        return not default
    if annotation is str:
        return "s3cret"
    if default is None:  # int | None
        return 7
    return default + 1 if isinstance(default, int) else default * 2


def _serve_params():
    return {p.name: p for p in typer.main.get_command(app).commands["serve"].params}


def test_every_setting_is_a_cli_option_with_its_default_and_help():
    params = _serve_params()
    assert set(FIELDS) <= set(params)
    for name, info in FIELDS.items():
        param = params[name]
        assert option_name(name) in param.opts, name
        if info.annotation is bool:
            assert "--no-" + option_name(name)[2:] in param.secondary_opts, name
        assert param.default == info.default, name
        assert info.description and param.help == info.description, name
    # the names users type today
    for flag in ("--max-kv-tokens", "--max-num-batched-tokens", "--header-timeout-s"):
        assert any(flag in p.opts for p in params.values()), flag
    assert "--no-prefix-cache" in params["prefix_cache"].secondary_opts
    assert "--no-batching" in params["batching"].secondary_opts
    assert params["api_key"].envvar == "MODELPRESS_API_KEY"


def test_cli_options_reach_the_settings(monkeypatch, tmp_path):
    seen = []

    def capture(values, name):
        seen.append(settings_from(values, name))
        raise ModelpressError("stop before serving")

    monkeypatch.setattr(serve_command, "settings_from", capture)
    args = [str(tmp_path)]
    for name in FIELDS:
        value = _other_value(name)
        if isinstance(value, bool):
            args.append(option_name(name) if value else "--no-" + option_name(name)[2:])
        else:
            args += [option_name(name), str(value)]
    with pytest.raises(ModelpressError, match="stop before serving"):
        typer.main.get_command(app).main(args=["serve", *args], standalone_mode=False)
    assert seen[0].model_dump() == {"artifact": str(tmp_path.resolve()),
                                    **{name: _other_value(name) for name in FIELDS}}


@pytest.mark.parametrize("changed", [False, True])
def test_settings_round_trip_through_the_environment(changed):
    settings = ServeSettings(**{name: _other_value(name) for name in FIELDS}, artifact="/a"
                             ) if changed else ServeSettings()
    env = settings.to_env()
    assert set(env) == {env_name(n) for n, v in settings.model_dump().items() if v is not None}
    assert all(k.startswith("MODELPRESS_") for k in env)
    assert ServeSettings.from_env(env) == settings
    assert ServeSettings.from_env({"MODELPRESS_MAX_KV_TOKENS": "1024"}).max_kv_tokens == 1024


def test_each_layer_gets_its_group_and_one_default_per_setting():
    groups = (ServerSettings, Limits, EngineConfig, ConnectionLimits)
    names = [n for g in groups for n in g.model_fields]
    assert sorted(names) == sorted(ServeSettings.model_fields)  # each declared once
    settings = ServeSettings(**{name: _other_value(name) for name in FIELDS})
    for group, part in ((Limits, settings.limits), (EngineConfig, settings.engine),
                        (ConnectionLimits, settings.connections)):
        assert type(part) is group
        assert part.model_dump() == settings.model_dump(include=set(group.model_fields))
    # the defaults the engine, the routes and the connection guards use alone
    defaults = ServeSettings()
    assert EngineConfig().model_dump() == defaults.engine.model_dump()
    assert Limits().model_dump() == defaults.limits.model_dump()
    assert ConnectionLimits().model_dump() == defaults.connections.model_dump()
    assert EngineConfig().max_kv_tokens == 65_536  # was 32,768 here, 65,536 in the CLI


def test_start_server_refuses_an_unknown_or_bad_keyword(tmp_path):
    with pytest.raises(SettingsError, match=r"^max_kv_token: unknown setting$"):
        start_server(tmp_path, max_kv_token=1024)
    with pytest.raises(SettingsError, match=r"^max_running: .*less than or equal to 1024"):
        start_server(tmp_path, max_running=4096)


def test_a_bad_environment_value_names_its_variable():
    with pytest.raises(SettingsError, match=r"^MODELPRESS_MAX_KV_TOKENS: .*valid integer"):
        ServeSettings.from_env({"MODELPRESS_MAX_KV_TOKENS": "lots"})
    with pytest.raises(SettingsError, match=r"^MODELPRESS_LONG_INPUT: .*'truncate' or "):
        ServeSettings.from_env({"MODELPRESS_LONG_INPUT": "chop"})


@pytest.mark.parametrize(("args", "message"), [
    (["--max-kv-tokens", "0"], "error: --max-kv-tokens: Input should be greater than or "
                               "equal to 1"),
    (["--long-input", "chop"], "error: --long-input: Input should be 'truncate' or "
                               "'reject'"),
    (["--max-running", "many"], "Invalid value for '--max-running'"),
])
def test_a_bad_cli_value_is_one_line_naming_the_option(tmp_path, args, message):
    result = run_cli("serve", str(tmp_path), *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
