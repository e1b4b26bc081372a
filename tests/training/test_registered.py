"""comoe.training.registered: the registry-backed names of a run's adapter config (routing, expert bank, mix
strategy, auxiliary objectives) are refused in the settings' one-line wording, naming the YAML file."""

import pytest
import yaml

from comoe.settings import load_settings
from comoe.training.registered import check_registered_names
from comoe.training.settings import METHODS, TrainArgs
from comoe.validation import InvalidSetting


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"routing": "topkk"}, "routing='topkk' is not a registered routing kind"),
        ({"expert_bank": "hidra"}, "expert_bank='hidra' is not a registered expert bank"),
        ({"expert_compute": "fast"}, "expert_compute='fast' is not a registered strategy"),
        ({"aux_objectives": {"nope": 1.0}}, "auxiliary objective 'nope' is not registered"),
        ({"routing": "soft"}, "contrastive='comoe' contrasts each token's activated experts"),  # always 0
        ({"num_experts": 2, "top_k": 2}, "contrastive='comoe' contrasts each token's activated experts"),
        (  # a registered bank, but not one whose experts are LoRA updates, as FFN-block experts need
            {"ffn_experts": ["mlp"], "expert_bank": "dora", "contrastive": "none"},
            "expert_bank='dora' with ffn_experts: FFN-block experts add LoRA updates",
        ),
    ],
)
def test_an_unregistered_name_is_one_line_naming_the_file_and_field(tmp_path, caplog, override, named):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tmp_path / "not-a-model"), "adapter_config": override}))
    settings = load_settings(TrainArgs, config, {"device": "cpu"})
    with pytest.raises(InvalidSetting) as raised:
        check_registered_names(settings)
    assert str(raised.value).startswith(f"{config}: adapter_config: {named}")
    assert "\n" not in str(raised.value)
    assert not caplog.records  # the error alone, not the inference loader's warning first


@pytest.mark.parametrize("preset", METHODS)
def test_every_presets_names_are_registered(preset):
    check_registered_names(TrainArgs(preset=preset))  # raises for an unregistered name
