"""k8s/rayjob.yaml and the Dockerfile, cross-checked offline (no Kubernetes or Docker here) against what they
must agree with: the entrypoint against jobs/train.py's own parser, the outputs' path against the volume
mounted there, the GPU worker group against the workers the entrypoint asks for, the image against the
installed Ray, the Dockerfile against where the RayJob runs the job."""

import re
import shlex
from importlib import metadata

import pytest
import yaml

from clf import cli
from clf.config import TrainConfig
from tests.helpers import ROOT

RAY_VERSION = metadata.version("ray")


@pytest.fixture(scope="module")
def documents():
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def rayjob(documents):
    return documents["RayJob"]


def train_config(rayjob) -> TrainConfig:
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:2] == ["python", "/home/ray/clf/jobs/train.py"]  # where the Dockerfile puts the project
    return cli.parse(TrainConfig, "test", words[2:])


def test_entrypoint_parses_with_the_jobs_own_parser(rayjob):
    cfg = train_config(rayjob)
    assert cfg.use_gpu
    assert cfg.storage_path.startswith("s3://")  # every node reaches the checkpoints
    assert cfg.output.startswith("/outputs/")  # on the claim that outlives the head pod


def test_outputs_go_to_a_claim_mounted_on_the_head(documents, rayjob):
    claim = documents["PersistentVolumeClaim"]["metadata"]["name"]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = head["containers"][0]["volumeMounts"]
    outputs = next(m for m in mounts if train_config(rayjob).output.startswith(m["mountPath"] + "/"))
    assert volumes[outputs["name"]]["persistentVolumeClaim"]["claimName"] == claim
    fetch = yaml.safe_load((ROOT / "k8s" / "fetch-outputs.yaml").read_text())
    assert fetch["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def test_the_gpu_workers_cover_the_training_workers(rayjob):
    cfg = train_config(rayjob)
    gpus = sum(
        group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.num_workers is not None and gpus >= cfg.num_workers


def test_the_image_is_rays_of_the_installed_version(rayjob):
    base = re.search(r"^FROM rayproject/ray:(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert base, "the Dockerfile starts from Ray's official image"
    assert base.group(1).split("-")[0] == RAY_VERSION
    assert base.group(1).endswith("gpu")  # CUDA for --use-gpu


def test_the_image_installs_the_package_and_keeps_no_source_tree_beside_the_jobs():
    # jobs/*.py put their parent folder first on sys.path: a clf/ there would shadow the installed wheel on the
    # driver while the workers used the wheel. The image installs the wheel and copies only jobs/ beside.
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    package_copies = [line.split()[-1] for line in lines if line.startswith("COPY") and " clf " in f"{line} "]
    assert package_copies and all(dest.startswith("/tmp/") for dest in package_copies)
    source = package_copies[0].rsplit("/clf", 1)[0]
    assert any(line.startswith("RUN pip install") and source in line for line in lines)
    workdir = [line.split()[1] for line in lines if line.startswith("WORKDIR")][-1]
    assert f"{workdir}/jobs/train.py" == "/home/ray/clf/jobs/train.py"  # the RayJob's entrypoint
