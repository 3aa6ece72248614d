"""The gin files select what the code defines once: model presets (phijax.config.PRESETS) by name,
with single-field overrides, and the sharding rule table (phijax.sharding.DEFAULT_RULES), with
single-entry overrides; unknown names are errors that name them."""
import copy
import glob
import os

import gin
import pytest

from phijax import config, sharding, train_setup
from phijax import train  # registers `train` and, through phijax.gin_bindings, the phijax.* gin names
from phijax.util import gin_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_GINS = sorted(glob.glob(os.path.join(REPO, "gin", "models", "*.gin")))


def _model(gin_file, *params):
    gin_config.parse([gin_file], list(params))
    return copy.deepcopy(gin.query_parameter("%MODEL"))  # deepcopy evaluates the @reference


def _train_bindings(experiment, *params):
    gin_config.parse([os.path.join(REPO, "gin", "experiments", experiment)], ["MODEL_DIR = 'unused'", *params])
    return gin.get_bindings("train")  # references evaluated: the PhiConfig and rules train() receives


def test_every_model_gin_file_is_its_code_preset():
    names = [os.path.basename(f)[:-len(".gin")] for f in MODEL_GINS]
    assert sorted(names) == sorted(config.PRESETS)
    for gin_file, name in zip(MODEL_GINS, names):
        cfg = _model(gin_file)
        assert type(cfg) is config.PhiConfig
        assert cfg.to_dict() == config.preset(name).to_dict(), name  # field by field


def test_phiconfig_field_bindings_override_the_preset():
    nano = os.path.join(REPO, "gin", "models", "nano.gin")
    assert _model(nano, "phijax.PhiConfig.d_mlp = 128", "phijax.PhiConfig.dtype = 'bfloat16'") == \
        config.preset("nano", d_mlp=128, dtype="bfloat16")
    # An experiment file's overrides, then a --gin_param on top.
    assert _train_bindings("cpu_demo.gin")["model_config"] == \
        config.preset("tiny", scan_unroll=4, loss_chunk=32, attention="cpu", loss_kernel="cpu")
    assert _train_bindings("cpu_demo.gin")["compiler_options"] == train_setup.CPU_ONEDNN_DOTS
    assert _train_bindings("cpu_demo.gin", "phijax.PhiConfig.d_mlp = 256")["model_config"] == \
        config.preset("tiny", scan_unroll=4, loss_chunk=32, attention="cpu", loss_kernel="cpu",
                      d_mlp=256)
    assert _train_bindings("phi1_pretrain.gin", "CODE_SOURCES = ['unused']", "TEXTBOOK_SOURCES = None",
                           "TOKENIZER = None")["model_config"] == config.preset(
        "phi1", attn_dropout=0.1, resid_dropout=0.1, dtype="bfloat16", remat_policy="save_dots_no_batch",
        loss_chunk=256)
    # The operative config records the preset's name and the overridden fields.
    operative = gin.operative_config_str()
    assert "model_preset.name = 'phi1'" in operative and "PhiConfig.loss_chunk = 256" in operative


def test_unknown_preset_or_field_is_an_error_naming_it(capsys, tmp_path):
    nano = os.path.join(REPO, "gin", "models", "nano.gin")
    with pytest.raises(ValueError, match="unknown model preset 'phi9'"):
        _model(nano, "phijax.model_preset.name = 'phi9'")
    with pytest.raises(gin_config.GinError, match="no_such_field"):
        _model(nano, "phijax.PhiConfig.no_such_field = 1")
    rc = train.main(["--gin_file=experiments/cpu_demo.gin", f"--gin_param=MODEL_DIR = '{tmp_path}'",
                     "--gin_param=phijax.model_preset.name = 'phi9'"])
    assert rc == 2 and "unknown model preset 'phi9'" in capsys.readouterr().err


def test_sharding_gin_binds_the_code_rules_and_overrides_one_entry():
    assert _train_bindings("cpu_demo.gin")["sharding_rules"] == sharding.DEFAULT_RULES
    rules = _train_bindings("cpu_demo.gin", "phijax.sharding.standard_rules.overrides = [('embed', None)]")
    assert rules["sharding_rules"] == sharding.standard_rules([("embed", None)])
    assert dict(rules["sharding_rules"])["embed"] is None
    with pytest.raises(ValueError, match="'embedding'"):
        _train_bindings("cpu_demo.gin", "phijax.sharding.standard_rules.overrides = [('embedding', None)]")
