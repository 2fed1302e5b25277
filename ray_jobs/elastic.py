"""
Elastic worker groups and preemption handover for the training stages.

`--num-workers MIN-MAX` runs a stage on Ray Train's elastic scaling: after a node is lost the group restarts at
whatever size the cluster can give (at least MIN) from the newest complete checkpoint, and it grows when room
appears (checked every --resize-check-s). Two things are added on top of Ray Train:

- Only world sizes that keep the global batch exact are ever used (`world_sizes`, checked at start-up); Ray's
  count of possible workers is rounded down to the nearest such size, and it leaves out dead and draining nodes
  (Ray's own count lags a lost node, which cost a full worker-group start-up timeout at the old size).
- A planned resize loses no work: instead of restarting the group at once, the policy asks the workers (through a
  `Handover` actor) to checkpoint at their next step boundary, and restarts them only once they have. A node
  drain (preemption notice) takes the same path from the workers' side: they see `ray.train.get_preemption_info()`
  at a step boundary, checkpoint, and wait for Ray to restart the group without the node.
"""
import time

import ray
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_jobs.elastic_actors import ping


def parse_num_workers(text):
    """'4' -> (4, 4); '2-8' -> (2, 8). None / '' -> None (the launcher's default)."""
    if text in (None, ""):
        return None
    lo, _, hi = str(text).partition("-")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"--num-workers {text!r}: expected N or MIN-MAX (e.g. 8-32)") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"--num-workers {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def world_sizes(lo, hi, error):
    """The sizes in [lo, hi] for which error(size) is "" and {size: reason} for the others. Raises when no size
    is left, naming each one's reason."""
    ok, skipped = [], {}
    for size in range(lo, hi + 1):
        reason = error(size)
        if reason:
            skipped[size] = reason
        else:
            ok.append(size)
    if not ok:
        raise ValueError("no world size in " + (f"{lo}-{hi}" if hi > lo else str(lo)) + " keeps the global batch: " +
                         "; ".join(f"{w} workers: {r}" for w, r in skipped.items()))
    return ok, skipped


LOST_NODE_PROBE_S = 5.0  # a node that runs no task in this time after its workers died counts as lost
LOST_NODE_MEMORY_S = 120.0  # ... until Ray itself has noticed (its health checks take tens of seconds)


def _unresponsive(node_ids):
    """The nodes among node_ids that cannot run a task right now."""
    pings = {node: ping.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
             for node in node_ids}
    ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=LOST_NODE_PROBE_S)
    return {node for node, ref in pings.items() if ref not in ready}


def _draining_nodes():
    """The ids of the nodes Ray is draining (a preemption notice, a scale-down)."""
    return set(ray._private.state.state.get_draining_nodes() or {})


def _live_capacity(resources_per_worker, excluded=()):
    """Workers that fit on the nodes that are alive, not draining and not excluded (total resources)."""
    excluded = set(excluded) | _draining_nodes()
    need = {k: v for k, v in resources_per_worker.items() if v > 0}
    total = 0
    for node in ray.nodes():
        if node["Alive"] and node["NodeID"] not in excluded:
            total += int(min(node["Resources"].get(k, 0) // v for k, v in need.items())) if need else 0
    return total


class ElasticPolicy(ElasticScalingPolicy):
    """Ray Train's elastic policy, restricted to `sizes`, blind to dead and draining nodes, and resizing a running
    group only after its workers have checkpointed (see the module docstring)."""

    def __init__(self, scaling_config, sizes, handover):
        super().__init__(scaling_config)
        self.sizes, self.handover, self.pending = sorted(sizes), handover, None
        self.group_nodes, self.lost_nodes = set(), {}  # the running group's nodes; node -> when found lost

    def _count_possible_workers(self, reserved_resources):
        now = time.monotonic()
        self.lost_nodes = {n: t for n, t in self.lost_nodes.items() if now - t < LOST_NODE_MEMORY_S}
        n = min(super()._count_possible_workers(reserved_resources),
                _live_capacity(self.scaling_config._resources_per_worker_not_none, self.lost_nodes))
        return max((s for s in self.sizes if s <= n), default=0)

    def make_decision_for_non_running_worker_group(self):
        self.pending = None  # a group restarted for another reason (a preemption, a lost node) cancels a resize
        if self.group_nodes:  # the group just ended: were its nodes lost? (Ray's node table lags by tens of s)
            self.lost_nodes.update({n: time.monotonic() for n in _unresponsive(self.group_nodes)})
            self.group_nodes = set()
        return super().make_decision_for_non_running_worker_group()

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        self.group_nodes = {w.metadata.node_id for w in worker_group_state.workers}
        if self.pending is not None:
            if ray.get(self.handover.get_handed_over.remote(), timeout=10) is None:
                return NoopDecision()  # the workers have not reached a step boundary yet
            decision, self.pending = self.pending, None
            return decision
        decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        if isinstance(decision, ResizeDecision):  # first a checkpoint at the workers' next step boundary
            self.pending = decision
            ray.get(self.handover.request.remote(self._resize_reason(decision, worker_group_state)), timeout=10)
            return NoopDecision()
        return decision

    def _resize_reason(self, decision, worker_group_state):
        """Why the group resizes: it grows, or it shrinks because one of its nodes is draining (a preemption notice:
        this check can see the drain before the workers see Ray's preemption info, and the resize is the same
        event), or for another reason."""
        if decision.num_workers > worker_group_state.num_workers:
            return "grown"
        return "preempted" if self.group_nodes & _draining_nodes() else "shrunk"


class ElasticTorchTrainer(TorchTrainer):
    """TorchTrainer whose controller uses `scaling_policy` (None: the one Ray Train builds from the ScalingConfig),
    without Ray Train's placement-group cleaner. That detached actor asks the state API, every second, whether the
    controller lives, and finds the cluster by the machine's default address (RAY_ADDRESS, else the last `ray start`
    on the head): with no dashboard it only logs a warning a second, and with a second Ray instance on the machine it
    asks that one. Nothing here needs it: it removes the group's placement group when the controller dies and the
    driver lives on, but a stage whose controller dies fails its job, and a job's placement groups end with it."""

    def __init__(self, *args, scaling_policy, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaling_policy = scaling_policy

    def _initialize_and_run_controller(self, **controller_kwargs):
        if self.scaling_policy is not None:
            controller_kwargs["scaling_policy"] = self.scaling_policy
        controller_kwargs["callbacks"] = [cb for cb in controller_kwargs["callbacks"]
                                          if not isinstance(cb, PlacementGroupCleanerCallback)]
        return super()._initialize_and_run_controller(**controller_kwargs)
