"""cluster.yaml passes Ray's own cluster-config validation, offline."""

import copy
import re

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


def test_cpu_head_autoscaling_gpu_workers(config):
    head = config["available_node_types"][config["head_node_type"]]
    workers = config["available_node_types"]["gpu_worker"]
    assert head["node_config"]["InstanceType"].startswith("m5")  # a CPU instance
    assert workers["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))  # GPU instances
    assert workers["max_workers"] > workers["min_workers"]
    assert any("pip install" in c and "clf" in c for c in config["setup_commands"])


def test_dashboard_stays_on_loopback(config):
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()


def test_every_node_starts_with_token_auth_and_the_token_stays_out_of_the_repo(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    # The token is copied from the user's machine, not from the checkout.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not re.search(r"\b[0-9a-f]{32,}\b", (ROOT / "cluster.yaml").read_text())
