# The image the KubeRay RayJob in k8s/rayjob.yaml runs: Ray's official GPU image of the Ray version the
# project is tested with (tests/test_k8s.py checks that it equals the installed Ray), with clf, PyTorch and
# Fashion-MNIST added. Build and push it where your cluster pulls from:
#
#   docker build -t YOUR-REGISTRY/clf:0.1.0 . && docker push YOUR-REGISTRY/clf:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu

# Fashion-MNIST's four idx files, in /usr/share/datasets/fashion-mnist, where jobs/train.py looks.
RUN sudo apt-get update \
    && sudo apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && sudo rm -rf /var/lib/apt/lists/*

WORKDIR /home/ray/clf
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users clf ./clf
COPY --chown=ray:users jobs ./jobs
# Ray is already in the image; this adds PyTorch (CUDA wheels from PyPI), torchvision, torchmetrics and the
# rest of pyproject.toml's dependencies.
RUN pip install --no-cache-dir .
