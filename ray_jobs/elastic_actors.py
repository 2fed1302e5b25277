"""
The remote pieces of elastic training, in a module of their own: it imports Ray core only, so the processes that
run them (one Handover actor per run, probe tasks after a loss) start in about a second instead of importing Ray
Train and torch.
"""
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
class Handover:
    """Where the scaling policy (in Ray Train's controller) and the workers meet. The policy requests a
    checkpoint; rank 0 reports the step it handed over at (also after a preemption notice); the next group's rank 0
    takes the reason it was started for."""

    def __init__(self):
        self.requested, self.handed_over = "", None

    def request(self, reason):
        self.requested = reason

    def get_request(self):
        return self.requested

    def hand_over(self, step, reason):
        self.handed_over = (step, reason)

    def get_handed_over(self):
        return self.handed_over

    def take(self):
        """The last handover's reason, once (None if the group was restarted without one: a node or worker lost)."""
        out, self.handed_over, self.requested = self.handed_over, None, ""
        return out and out[1]


def start_handover():
    """A Handover on the driver's node (a worker node may be the one that goes away)."""
    node = ray.get_runtime_context().get_node_id()
    return Handover.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


@ray.remote(num_cpus=0)
def ping():
    return True
