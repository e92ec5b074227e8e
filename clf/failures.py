"""How a failed fit() becomes one of our errors (one line for a person) or stays a bug (its traceback)."""

from __future__ import annotations

import ray.exceptions

from clf import ray_private
from clf.errors import ClfError, first_line


def training_failure(error: Exception, placed_before: bool, asked: str = "the workers") -> Exception:
    """What a failed fit() means, decided by the original exception's type: a ClfError for the failures we
    expect (a ClfError raised in a worker, a worker that died past --max-failures, workers Ray could not
    place), else `error` itself, a bug to show with its traceback (Ray's message carries the worker's).
    `placed_before`: whether the run's workers had been placed and trained (then a placement that fails is one
    after a failure); `asked`: what the run asks for, in words."""
    from ray.train import ControllerError, WorkerGroupError

    from clf.cluster import cluster_nodes
    from clf.plan import placement_tries

    if isinstance(error, ControllerError):
        failure = error.controller_failure
        # Ray names the "could not place the workers" failure only by a private class.
        if ray_private.is_startup_timeout(failure) and placed_before:
            return ClfError(
                f"training failed: after a failure, {failure.num_workers} workers could not be placed again "
                f"in {placement_tries()} tries (a node lost for good?); with --min-workers a run goes on "
                "with the workers that fit"
            )
        if ray_private.is_startup_timeout(failure):
            return ClfError(f"training failed: {asked} could not be placed in {placement_tries()} tries; the "
                            f"cluster has {cluster_nodes().describe_free()}")
        return ClfError(f"training failed: {first_line(failure)}")
    if isinstance(error, WorkerGroupError):
        for rank, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, ClfError):
                return type(failure)(f"training failed on worker {rank}: {first_line(failure)}")
        for rank, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, (ray.exceptions.RayError, ray_private.ray_train_error())):  # a dead actor, a failed health check
                return ClfError(f"training failed: worker {rank} died ({first_line(failure)})")
    return error
