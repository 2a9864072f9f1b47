import json
import re
import subprocess
import sys

from obliviate.cli import main


def test_unknown_concept_exits_2_with_the_list(data_dir, tiny_model_dir, tmp_path, capsys):
    code = main(["erase", "--concept", "Quidditch", "--data", str(data_dir), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Available:" in err and "Golf" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_missing_model_path_and_bad_values_exit_2(data_dir, tmp_path, capsys):
    code = main(["erase", "--concept", "Golf", "--data", str(data_dir), "--model", "./no/such/model", "--out", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["erase", "--concept", "Golf", "--data", str(data_dir), "--k", "lots", "--out", str(tmp_path / "o2")])
    assert code == 2 and "must be int" in capsys.readouterr().err
    code = main(["erase", "--concept", "Golf", "--data", str(data_dir), "--method", "magic", "--out", str(tmp_path / "o3")])
    assert code == 2 and "Available methods" in capsys.readouterr().err


def test_custom_concept_without_questions_needs_delta_then_reports_tokens(data_dir, tiny_model_dir, tmp_path, capsys):
    sentences = tmp_path / "pottery.txt"
    sentences.write_text("\n".join(f"The potter shapes clay vessel {i} on the wheel before the kiln." for i in range(12)))
    common = ["erase", "--concept", "Pottery", "--concept-sentences", str(sentences), "--data", str(data_dir),
              "--model", str(tiny_model_dir), "--k", "10", "--ratio-threshold", "1", "--no-save-model",
              "--coherence-new-tokens", "0"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 2
    assert "--delta" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "b"), "--delta", "3"]) == 0
    assert "plan: ember at delta 3.0; then the chosen edit measured once on TEST" in capsys.readouterr().out
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["delta"] == 3.0 and results["questions_available"] is False
    assert "efficacy" not in results and "qa_test" not in results  # no accuracy claims


def test_module_entry_point_and_help_are_fast_and_work():
    out = subprocess.run([sys.executable, "-m", "obliviate", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "erase" in out.stdout
    assert subprocess.run([sys.executable, "-m", "obliviate", "nonsense"], capture_output=True).returncode == 2


def test_every_command_and_eco_action_has_a_description_and_true_defaults(capsys):
    import contextlib

    from obliviate.cli import COMMANDS, main

    for args in [[name, "--help"] for name in COMMANDS] + [["eco", action, "--help"]
                                                           for action in ("fit", "generate", "evaluate")]:
        with contextlib.suppress(SystemExit):
            main(args)
        text = capsys.readouterr().out
        usage, _, rest = text.partition("\n\n")
        description = rest.split("\n\n")[0]
        assert description and not description.startswith(("options:", "positional")), args
        options = text.partition("options:")[2]
        assert not re.search(r"\w\.\.\.", options), args  # no flag's help cut mid-sentence
    with contextlib.suppress(SystemExit):
        main(["eco", "fit", "--help"])
    fit = " ".join(capsys.readouterr().out.split())
    assert "the classifier's negatives (default: 300)" in fit and "(default: 100)" not in fit.split("--general-questions N")[1][:120]


def _flags(command: str) -> set[str]:
    import argparse

    from obliviate.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {option for action in sub._actions for option in action.option_strings}


def test_one_name_one_meaning_and_each_command_shows_the_flags_it_reads():
    from obliviate.commands.arguments import GRID_SETTINGS

    grid_flags = {"--" + name.replace("_", "-") for name in GRID_SETTINGS}
    for command in ("erase", "compare"):  # they choose candidates on a grid
        assert grid_flags <= _flags(command), command
    for command in ("eval", "attack"):  # they evaluate one given model
        assert not grid_flags & _flags(command), command
    assert "--k" in _flags("erase") and "--k" not in _flags("attack")  # EMBER's features, not paragraphs
    assert "--in-context-paragraphs" in _flags("attack")
    assert "--judge-model" in _flags("erase") and "--judge-model" not in _flags("eval")
    assert "--judge-endpoint-model" in _flags("eval")
    every = set().union(*(_flags(c) for c in ("erase", "eval", "attack", "compare")))
    assert "--concept-prompts" in every and "--coherency-prompts" not in every


def test_lists_are_comma_separated_everywhere():
    import argparse

    from obliviate.commands.arguments import collect_overrides, comma_list

    assert comma_list("Gun, Golf,,Gambling") == ["Gun", "Golf", "Gambling"]
    assert comma_list(["Gun,Golf", "Gambling"]) == ["Gun", "Golf", "Gambling"]  # a repeated flag adds
    overrides = collect_overrides(argparse.Namespace(run__concept=["Gun,Golf"]))
    assert overrides["concept"] == "Gun" and overrides["concepts"] == ("Golf",)
