"""Every setting is declared once (powerfast.core.config.SETTINGS) and every entry point derives
its names, defaults, help and checks from that declaration: the configs, the engine's
SamplingParams, the command's flags, the server's body fields and the benchmarks' Settings."""

import argparse
import dataclasses
import math
import random
import typing
from pathlib import Path

import pytest
from conftest import fresh_seed

from powerfast import cli
from powerfast.core.config import (
    METHOD_SETTINGS,
    METHODS,
    PRESETS,
    SETTINGS,
    MCMCConfig,
    PowerConfig,
    SamplingConfig,
    SettingError,
    SIRConfig,
    SMCConfig,
    add_arguments,
    method_config,
    preset_defaults,
    settings_from_arguments,
)
from powerfast.serving.errors import InvalidRequestError
from powerfast.serving.params import REQUEST_FIELDS, SamplingParams


def bad_values(name: str) -> list:
    """Values the setting must refuse, drawn afresh: wrong types and out-of-range numbers."""
    setting = SETTINGS[name]
    rng = random.Random(fresh_seed())
    wrong_type = {int: [1.5, "3", True], float: ["1.0", True, None], bool: [1, "yes", None],
                  str: [3, None, "no-such-" + str(rng.randrange(10**6))]}[setting.kind]
    out = list(wrong_type)
    if setting.kind in (int, float):
        out += [-rng.randrange(1, 100), math.inf if setting.kind is float else -rng.randrange(100, 10**6)]
        if setting.kind is float:
            out.append(math.nan)
    return [value for value in out if setting.check is None or setting.check(value) is not None or
            setting.choices is not None]


def test_every_config_field_is_a_declared_setting():
    for config in (PowerConfig, MCMCConfig, SMCConfig, SIRConfig):
        for field in dataclasses.fields(config):
            assert field.metadata["setting"] is SETTINGS[field.name]
            assert field.default == SETTINGS[field.name].default
    assert {name for names in METHOD_SETTINGS.values() for name in names} == set(SETTINGS)
    assert set(METHOD_SETTINGS) == set(METHODS)


def test_configs_are_built_by_keyword_only():
    with pytest.raises(TypeError):
        PowerConfig(4.0)  # noqa
    with pytest.raises(TypeError):
        SMCConfig(4.0, 8)  # noqa
    assert PowerConfig(alpha=2.0).alpha == 2.0


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_bad_value_names_its_field_everywhere(name):
    values = bad_values(name)
    assert values, name
    for value in values:
        with pytest.raises(SettingError) as error:
            method_config("greedy", **{name: value})  # greedy uses no setting: checked all the same
        assert error.value.field == name and repr(value)[:20] in str(error.value)
        with pytest.raises(InvalidRequestError) as error:
            SamplingParams(method="plain", **{name: value})
        assert error.value.field == name


def test_cross_field_errors_name_a_field():
    cases = [(dict(num_rollouts=1), "jackknife"), (dict(top_k=9, num_candidates=4), "top_k"),
             (dict(block_size=8, horizon=4, reuse_rollouts=True), "reuse_rollouts"),
             (dict(num_rollouts=8, rollouts_per_round=3), "rollouts_per_round")]
    for settings, field in cases:
        with pytest.raises(SettingError) as error:
            method_config("power", **settings)
        assert error.value.field == field
        with pytest.raises(InvalidRequestError) as error:
            SamplingParams(method="power", **settings)
        assert error.value.field == field
    # sir's q is p at the temperature: greedy (0) is refused for sir alone, with the value
    with pytest.raises(SettingError) as error:
        method_config("sir", temperature=0.0)
    assert error.value.field == "temperature" and "got 0.0" in str(error.value)
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(method="sir", temperature=0.0)
    assert error.value.field == "temperature" and "got 0.0" in str(error.value)
    # the same values are no error for a method that does not combine them
    assert SamplingParams(method="plain", num_rollouts=1, top_k=9, num_candidates=4).method == "plain"
    assert SamplingParams(method="best-of-n", temperature=0.0).method == "best-of-n"
    with pytest.raises(SettingError) as error:
        method_config("power", nonsense=3)
    assert error.value.field == "nonsense"


def test_sampling_params_hold_every_setting_with_the_serving_preset():
    # SamplingParams is written out (readable by grep and an IDE): this keeps it equal to the
    # declarations, failing when a setting or request field is added, renamed, retyped or
    # given another default without the class
    fields = {field.name: field.default for field in dataclasses.fields(SamplingParams)}
    types = typing.get_type_hints(SamplingParams)
    assert list(fields) == list(REQUEST_FIELDS) + list(SETTINGS)
    assert {name: fields[name] for name in SETTINGS} == preset_defaults("serving")
    assert {name: types[name] for name in SETTINGS} == {name: setting.kind for name, setting in SETTINGS.items()}
    assert {name: (types[name], fields[name]) for name in REQUEST_FIELDS} == \
        {name: (kind, default) for name, (kind, default, _) in REQUEST_FIELDS.items()}
    assert all(SETTINGS[name].help in SamplingParams.__doc__ for name in SETTINGS)
    with pytest.raises(TypeError):
        SamplingParams("power")  # noqa: keyword only
    params = SamplingParams(method="power", num_rollouts=6, seed=3)
    assert params.config() == method_config("power", preset="serving", num_rollouts=6)


def test_requests_roll_out_tempered_and_the_paper_preset_from_p():
    # the horizon study's choice for the serving shape (M = 4, H = 16); the paper's stays the paper's
    assert SamplingParams(method="power").config().rollout_proposal == "tempered"
    assert method_config("power", preset="serving").rollout_proposal == "tempered"
    assert method_config("power").rollout_proposal == method_config("power", preset="paper").rollout_proposal == "base"
    assert SamplingParams(method="power", rollout_proposal="base").config().rollout_proposal == "base"


def test_the_small_preset_is_the_validated_configuration():
    # the preset must be what validation chose: the power arm of the test specs, committed before the
    # test ran (bench/study_test_*.json), every setting the arm names and nothing else changed
    import json

    bench = Path(__file__).resolve().parents[1] / "bench"
    specs = sorted(p for p in bench.glob("study_test_*.json") if not p.stem.endswith("_token"))
    assert len(specs) == 4, specs
    for spec in specs:
        arm = next(a for a in json.loads(spec.read_text())["arms"] if a["name"] == "power-small")
        assert {k: v for k, v in arm["settings"].items() if k != "kv_memory"} == PRESETS["small"], spec.name
    config = method_config("power", preset="small")
    assert (config.alpha, config.block_size, config.num_candidates, config.top_k, config.num_rollouts,
            config.horizon, config.rollout_proposal, config.candidate_proposal) == (
        8.0, 8, 8, 4, 4, 16, "tempered", "tempered")
    # alpha is shared: the other methods target the same p^8 under it, their own settings unchanged
    assert method_config("smc", preset="small").alpha == 8.0
    assert method_config("smc", preset="small").num_particles == method_config("smc").num_particles
    assert settings_from_arguments(parsed(["--preset", "small", "--rollouts", "6"])) == {
        **preset_defaults("small"), "num_rollouts": 6}


def parsed(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser(["sample", "x", *argv]).parse_args(["sample", "x", *argv])


def test_command_flags_derive_every_setting_and_preset():
    assert settings_from_arguments(parsed([])) == preset_defaults("paper")
    assert settings_from_arguments(parsed(["--preset", "serving"])) == preset_defaults("serving")
    args = parsed(["--preset", "serving", "--rollouts", "3", "--no-jackknife", "--eta", "7.5"])
    assert settings_from_arguments(args) == {**preset_defaults("serving"), "num_rollouts": 3, "jackknife": False,
                                             "eta": 7.5}
    help_text = cli.build_parser(["sample"]).format_help() + "".join(
        action.help or "" for action in cli.build_parser(["sample", "x"])._subparsers._group_actions[0]
        .choices["sample"]._actions)
    assert all(SETTINGS[name].help in help_text for name in SETTINGS)
    # the same spelling and check in the benchmark's parser
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_arguments(parser.parse_args([])) == preset_defaults("paper")


def test_command_refuses_a_bad_setting_naming_it(capsys):
    assert cli.main(["sample", "x", "--method", "plain", "--alpha", "-1"]) == 2
    assert "alpha must be a positive finite number, got -1.0" in capsys.readouterr().err


def test_best_of_n_defaults_come_from_the_declaration_or_a_named_preset():
    assert method_config("best-of-n") == SamplingConfig(temperature=1.0, num_samples=SETTINGS["num_samples"].default)
    assert SamplingParams(method="best-of-n").num_samples == PRESETS["serving"]["num_samples"]
    assert settings_from_arguments(parsed([]))["num_samples"] == SETTINGS["num_samples"].default


def test_sir_defaults_come_from_the_declaration_or_a_named_preset():
    assert method_config("sir") == SIRConfig(alpha=SETTINGS["alpha"].default, temperature=1.0,
                                             num_samples=SETTINGS["num_samples"].default)
    assert SamplingParams(method="sir").config() == SIRConfig(num_samples=PRESETS["serving"]["num_samples"])
    assert SamplingParams(method="sir", num_samples=5).branches() == (5, "num_samples")


def test_server_body_fields_are_the_settings():
    pytest.importorskip("fastapi")
    from powerfast.serving.server import _OPENAI_FIELDS, POWER_FIELDS, parse_sampling_params

    assert set(POWER_FIELDS) | set(_OPENAI_FIELDS) >= set(SETTINGS) | {"method"}
    for name, setting in SETTINGS.items():
        kind = POWER_FIELDS.get(name, _OPENAI_FIELDS.get(name))
        assert kind is setting.kind
    body = {"messages": [{"role": "user", "content": "hi"}], "alpha": -1}  # method plain: alpha unused
    with pytest.raises(InvalidRequestError) as error:
        parse_sampling_params(body, chat=True)
    assert error.value.field == "alpha"


def test_benchmark_settings_derive_every_setting():
    from bench import e2e

    fields = [field.name for field in dataclasses.fields(e2e.Settings)]
    assert fields == ["seed", *SETTINGS]
    settings = e2e.Settings(num_rollouts=3)
    assert settings.config("power") == method_config("power", num_rollouts=3)
    assert settings.config("power-tr").rollout_proposal == "tempered" and settings.config("power-tr").reuse_rollouts
    with pytest.raises(SettingError):
        e2e.Settings(top_k=0).config("power")


def test_docs_settings_table_is_the_declaration():
    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    rows = {}
    for line in page.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in SETTINGS and cells[1].startswith("--"):
            rows[cells[0]] = cells[1:]
    assert list(rows) == list(SETTINGS)
    for name, (flag, default, users) in rows.items():
        setting = SETTINGS[name]
        shown = f"{setting.default:g}" if isinstance(setting.default, float) else str(setting.default)
        assert (flag, default) == (setting.option, shown), name
        assert users.split(", ") == [m for m, names in METHOD_SETTINGS.items() if name in names], name
