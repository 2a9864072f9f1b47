import pytest

from obliviate.api import make_config
from obliviate.config import merge, run_config_from_dict
from obliviate.errors import ObliviateError


def test_yaml_sections_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("concept: Golf\nember:\n  k: 50\n  delta_grid: [1, 5]\nmodel:\n  device: cpu\n")
    config = make_config(path, seed=7, ember={"sparsity": 0.02})
    assert config.concept == "Golf" and config.seed == 7
    assert config.ember.k == 50 and config.ember.sparsity == 0.02 and config.ember.delta_grid == (1.0, 5.0)


def test_defaults_match_the_reference():
    config = make_config()
    assert config.ember.k == 100 and config.ember.sparsity == 0.01 and config.seed == 42
    assert config.ember.patience == 500 and config.ember.max_iterations == 20000 and config.ember.reg == 1e-4
    assert config.ember.delta_grid == (0.5, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 200.0)
    assert config.ember.untie_embeddings is False and config.ember.tied_output == "neutral"  # differs on purpose: the reference leaks (README)
    assert config.ember.ratio_threshold == 2.0 and config.ember.selection == "contrast"


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ObliviateError, match="Unknown setting.*kk"):
        run_config_from_dict({"ember": {"kk": 3}})
    with pytest.raises(ObliviateError, match="Unknown section"):
        run_config_from_dict({"embr": {}})
    with pytest.raises(ObliviateError, match="must be int"):
        merge(make_config(), {"ember": {"k": "many"}})
    with pytest.raises(ObliviateError, match="delta_grid"):
        make_config(ember={"delta_grid": "1,-2"})


def test_method_settings_are_checked_when_the_config_is_built(tmp_path):
    """Every method's settings fail at config time, before any data or model loads."""
    with pytest.raises(ObliviateError, match="Unknown method 'sgd'"):
        make_config(method="sgd")
    with pytest.raises(ObliviateError, match="Unknown setting.*stepz.*methods.rmu"):
        make_config(method="rmu", methods={"rmu": {"stepz": "3"}})
    with pytest.raises(ObliviateError, match="methods.npo.steps must be int"):
        make_config(method="ember", methods={"npo": {"steps": "many"}})  # also methods the run does not use
    config = make_config(method="rmu", methods={"rmu": {"steps": "3"}})
    assert config.method_config().steps == 3 and config.method_config("ember") is config.ember


def test_ember_settings_given_as_a_method_setting_reach_embers_section(tmp_path):
    """--set ember.k=50 (or YAML methods: ember:) lands among the methods' settings; the run
    reads EMBER's from its own section, so it must arrive there, checked like the flags."""
    config = make_config(method="rmu", with_ember=True, ember={"sparsity": 0.02}, methods={"ember": {"k": "50"}})
    assert config.ember.k == 50 and config.ember.sparsity == 0.02 and "ember" not in config.methods
    path = tmp_path / "run.yaml"
    path.write_text("methods:\n  ember:\n    delta_grid: [1, 5]\n  rmu:\n    steps: 3\n")
    config = make_config(path)
    assert config.ember.delta_grid == (1.0, 5.0) and config.methods == {"rmu": {"steps": 3}}
    with pytest.raises(ObliviateError, match="Unknown setting.*kk"):
        make_config(methods={"ember": {"kk": "3"}})


def test_bad_method_setting_on_the_cli_exits_2_and_writes_nothing(tmp_path, capsys):
    from obliviate.cli import main

    out = tmp_path / "run"
    code = main(["erase", "--concept", "Golf", "--data", str(tmp_path / "missing"), "--out", str(out),
                 "--method", "rmu", "--set", "stepz=3"])
    assert code == 2 and "stepz" in capsys.readouterr().err and not out.exists()


def test_every_flag_has_plain_help_and_a_readable_metavar():
    """`--help` never shows internal names (RUN__CONCEPT) or a bare "default: None"."""
    from obliviate.cli import build_parser

    for command in ("erase", "eval", "attack", "compare"):
        parser = build_parser(command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help and "default: None" not in action.help, (command, action.option_strings)
            assert action.metavar is None or "__" not in str(action.metavar), (command, action.option_strings)
            assert "__" not in (action.metavar or action.dest.upper() if action.nargs != 0 else ""), action.option_strings


def test_optimizer_flag_reaches_the_method_and_the_attacks(tmp_path, capsys):
    from obliviate.cli import main

    base = ["--concept", "Golf", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    assert main(["erase", *base, "--method", "rmu", "--optimizer", "sgd9"]) == 2
    assert "optimizer must be one of" in capsys.readouterr().err
    assert main(["erase", *base, "--optimizer", "adamw8bit"]) == 2  # EMBER alone trains nothing
    assert "EMBER is not trained" in capsys.readouterr().err
    assert main(["attack", *base, "--attacks", "relearn,probe", "--optimizer", "sgd9"]) == 2
    assert "optimizer must be one of" in capsys.readouterr().err and not (tmp_path / "o").exists()
