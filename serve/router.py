"""
Conversation affinity across replicas, on Ray Serve's request-router API: every turn of a conversation goes to the
replica that holds its earlier turns in its prefix cache.

A client names its conversation with the `X-Session-Id` header (any string; the web UI's WebSocket needs none, as a
socket stays on one replica). The first request of a session goes to the replica that rendezvous hashing picks
among the live ones, so every proxy (one per node) agrees without sharing state; later requests follow the replica
the session last went to. When that replica has `imbalance` more requests queued than the least-loaded candidate,
or is gone, the request falls back to power-of-two-choices on load (and the session follows it there). Requests
without a session id are routed on load alone.

The HTTP proxy hands the router the request's headers, not its body, which is why the session is a header: routing
on the prompt itself (requests that share only a system prompt) needs the prompt at routing time, i.e. an ingress
deployment in front of the model replicas.
"""
import hashlib
import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, LocalityMixin, RequestRouter

MAX_SESSIONS = 100_000  # sessions remembered per router (least recently used forgotten first)


def rendezvous(session, replicas):
    """The replica with the highest hash of (session, replica): stable while it lives, and when it goes only its
    sessions move."""
    def score(replica):
        key = f"{session}|{replica.replica_id.unique_id}".encode()
        return hashlib.blake2b(key, digest_size=8).digest()
    return max(replicas, key=score)


class SessionAffinityRouter(FIFOMixin, LocalityMixin, RequestRouter):
    def initialize_state(self, imbalance=8):
        self.imbalance = imbalance
        self.sessions = OrderedDict()  # session id -> the replica id it last went to

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        """Ranks of replicas to try in turn: the session's replica first (when it has one and is not much busier
        than the others), then two at random, of which Serve takes the one with the shorter queue."""
        ids = self.apply_locality_routing(pending_request=pending_request)
        candidates = [r for r in candidate_replicas if r.replica_id in ids] or candidate_replicas
        if not candidates:
            return []
        fallback = [random.sample(candidates, min(2, len(candidates)))]
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if not session:
            return fallback
        by_id = {r.replica_id: r for r in candidates}
        preferred = by_id.get(self.sessions.get(session)) or rendezvous(session, candidates)
        # the queue lengths Serve has probed lately (Ray's own prefix-aware router reads the same cache)
        cache = getattr(self, "_replica_queue_len_cache", None)
        queued = {r.replica_id: cache.get(r.replica_id) if cache else None for r in candidates}
        known = [q for q in queued.values() if q is not None]
        mine = queued[preferred.replica_id]
        if mine is not None and known and mine - min(known) > self.imbalance:
            return fallback
        return [[preferred]] + fallback  # if the preferred replica refuses (full), the load-based choice follows

    def on_request_routed(self, pending_request, replica_id, result):
        super().on_request_routed(pending_request, replica_id, result)
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if session:
            self.sessions[session] = replica_id
            self.sessions.move_to_end(session)
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
