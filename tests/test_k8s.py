"""k8s/rayjob.yaml and the Dockerfile, cross-checked offline (no Kubernetes or Docker here) against what they
must agree with: the entrypoint against jobs/train.py's own parser, the outputs' path against the volume
mounted there, the GPU worker group against the workers the entrypoint asks for, the image against the
installed Ray; and the Dockerfile's own steps carried out in a folder, against where the RayJob runs the job."""

import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
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


def rayjob_entrypoint() -> str:
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text())}
    return docs["RayJob"]["spec"]["entrypoint"]


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


def dockerfile_instructions(text: str) -> list[tuple[str, list[str]]]:
    """The Dockerfile's instructions, continuation lines joined, comments left out: (keyword, its words)."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), shlex.split(rest)))
            pending = ""
    return instructions


def test_the_image_installs_the_package_and_keeps_no_source_tree_beside_the_jobs(tmp_path):
    """The Dockerfile's COPY, WORKDIR and RUN steps carried out in a folder standing for the image's root (its pip
    install for real, into a folder of its own; the system packages left out): the RayJob's entrypoint is there,
    no clf/ source beside the jobs, and the jobs import the installed package."""
    root, site, workdir = tmp_path / "image", tmp_path / "image" / "site", "/"
    for keyword, words in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "WORKDIR":
            workdir = words[0]
            (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = [w for w in words if not w.startswith("--")]
            target = root / posixpath.join(workdir, dest).lstrip("/")
            (target if dest.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
            for source in sources:
                into = target / Path(source).name if dest.endswith("/") else target
                (shutil.copytree if (ROOT / source).is_dir() else shutil.copy)(ROOT / source, into)
        elif keyword == "RUN":
            for command in " ".join(words).split("&&"):
                parts = shlex.split(command)
                if parts[:2] == ["pip", "install"]:
                    path = root / [p for p in parts[2:] if not p.startswith("-")][0].lstrip("/")
                    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                    "--target", str(site), str(path)], check=True, timeout=300, capture_output=True)
                elif parts[:2] == ["rm", "-rf"]:
                    for path in parts[2:]:
                        shutil.rmtree(root / path.lstrip("/"))
    job = shlex.split(rayjob_entrypoint())[1]  # the RayJob runs this path
    assert (root / job.lstrip("/")).is_file()
    assert not list(root.rglob("clf/pipeline.py")) or all(site in p.parents for p in root.rglob("clf/pipeline.py"))
    # The job puts its checkout's folder first on sys.path: the clf it then imports is the installed one.
    code = f"import sys; sys.path.insert(0, {str(root / posixpath.dirname(posixpath.dirname(job.lstrip('/'))))!r}); import clf; print(clf.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(site), proc.stdout
