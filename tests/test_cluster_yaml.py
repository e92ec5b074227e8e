"""cluster.yaml passes Ray's own cluster-config validation, offline (and the validation is real: a field Ray does
not know fails it). What its groups give the plan is tested in test_plan."""

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_with_rays_schema(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_validation_is_real(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError, match="not_a_field"):
        validate_config(prepare_config(broken))
