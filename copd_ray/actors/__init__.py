"""The Ray actors of a branch and the group that places and wires them."""

from copd_ray.batch import TrainBatch
from copd_ray.actors.branch import BranchGroup, PlacementError
from copd_ray.actors.generator import GeneratorActor
from copd_ray.actors.scorer import ScorerActor
from copd_ray.actors.trainer import TrainerActor

__all__ = ["BranchGroup", "GeneratorActor", "PlacementError", "ScorerActor", "TrainBatch", "TrainerActor"]
