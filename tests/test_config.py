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
