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

# clf installed as the wheel `pip install` builds (tests/test_packaging.py checks that it holds every module of
# clf/), with PyTorch (CUDA wheels from PyPI), torchvision, torchmetrics and the rest of pyproject.toml's
# dependencies; Ray is already in the image. The source tree is not kept: the driver and the workers on every
# node import the same installed package.
COPY --chown=ray:users pyproject.toml README.md /tmp/clf-src/
COPY --chown=ray:users clf /tmp/clf-src/clf
RUN pip install --no-cache-dir /tmp/clf-src && rm -rf /tmp/clf-src

# The jobs, run by path (the RayJob's entrypoint: python /home/ray/clf/jobs/train.py ...).
WORKDIR /home/ray/clf
COPY --chown=ray:users jobs ./jobs
