"""Registers with gin what the gin files name from modules that import without gin.

phijax.config, phijax.sharding and phijax.optim do not import gin (accelerator hosts may lack it),
so their gin names are given here; the training CLI (phijax.train) imports this module. The
values stay in the code, once: gin selects and overrides them.

* `phijax.PhiConfig`: the model configuration, one field per binding.
* `phijax.model_preset`: a named preset of phijax.config.PRESETS, as a gin/models/ file selects it:

      MODEL = @phijax.model_preset()
      phijax.model_preset.name = 'tiny'

  Any `phijax.PhiConfig.<field>` binding (an experiment file, a --gin_param) overrides that field
  of the preset. An unknown preset name raises ValueError naming it when MODEL is built; an
  unknown field is refused by gin when the binding is parsed.
* `phijax.sharding.standard_rules`: the logical -> mesh rule table, phijax.sharding.DEFAULT_RULES,
  with single entries overridable (gin/runs/sharding.gin).
* `phijax.optim.warmup_linear_decay`, `phijax.optim.adamw`: the schedule and optimizer.
* `data_source`: phijax.data.pipeline.DataSource, the run's data (`train.data_source = @data_source()`).
* `%phijax.CPU_ONEDNN_DOTS`: phijax.train_setup.CPU_ONEDNN_DOTS, XLA:CPU options for
  `train.compiler_options` (gin/experiments/cpu_demo.gin).
"""
from __future__ import annotations

import gin

from phijax import config, optim, sharding, train_setup
from phijax.data.pipeline import DataSource

PhiConfig = gin.external_configurable(config.PhiConfig, module="phijax")
gin.external_configurable(sharding.standard_rules, module="phijax.sharding")
gin.external_configurable(optim.warmup_linear_decay, module="phijax.optim")
gin.external_configurable(optim.adamw, module="phijax.optim")
data_source = gin.external_configurable(DataSource, "data_source")
gin.constant("phijax.CPU_ONEDNN_DOTS", train_setup.CPU_ONEDNN_DOTS)


@gin.configurable("model_preset", module="phijax")
def model_preset(name: str = gin.REQUIRED) -> config.PhiConfig:
    """The preset `name` (phijax.config.PRESETS), with the fields that gin binds on phijax.PhiConfig
    (in the current scope) taken from those bindings instead."""
    base = config.preset(name)  # raises ValueError naming an unknown preset
    bound = gin.get_bindings("phijax.PhiConfig", resolve_references=False)
    # Through gin's PhiConfig, passing only the preset's values for the fields gin does not bind:
    # gin supplies the rest, and the operative config records them as phijax.PhiConfig bindings.
    return PhiConfig(**{k: v for k, v in base.to_dict().items() if k not in bound})
