"""
Conversation affinity across replicas, on Ray Serve's request-router API: every turn of a conversation (and every
request opening with the same long prefix) goes to the replica that holds it in its prefix cache.

Ray's HTTP proxy shows a router the request's headers, not its body, so affinity works at two levels:
- A request with an `X-Session-Id` header (a conversation id, as `serve.chat_cli --url` sends) is routed by the
  proxy with SessionAffinityRouter below: to the replica the session went to before, or for a new session to the
  one that rendezvous hashing picks among the live replicas, so every proxy (one per node) agrees without sharing
  state. When that replica has `imbalance` more requests queued than the least-loaded candidate, or is gone, the
  request falls back to power-of-two-choices on load (and the session follows it there).
- A request without one lands on any replica, which reads its prompt and works out its owner: rendezvous hashing
  of the prompt's opening (affinity_key: up to the end of its first user message, at most 256 tokens, which every
  later turn of the conversation repeats) over the live replicas. If that is another replica, the request is passed
  to it through a deployment handle carrying the key as its session id, which this router sends to the same owner.
A WebSocket stays on one replica, and each of its turns is placed like a request without a header.
"""
import hashlib
import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, LocalityMixin, RequestRouter

MAX_SESSIONS = 100_000  # sessions remembered per router (least recently used forgotten first)


AFFINITY_TOKENS = 256  # the most of a prompt's opening that decides its owner


def affinity_key(prompt, user_end):
    """A prompt's opening, as a string: its tokens up to and including the first <|user_end|> (the system prompt and
    first question, which every later turn repeats), at most AFFINITY_TOKENS."""
    end = prompt.index(user_end) + 1 if user_end in prompt[:AFFINITY_TOKENS] else AFFINITY_TOKENS
    return hashlib.blake2b(repr(prompt[:end]).encode(), digest_size=12).hexdigest()


def rendezvous(key, replica_ids):
    """The replica id with the highest hash of (key, id): stable while it lives, and when it goes only its keys
    move."""
    return max(replica_ids, key=lambda rid: hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest())


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
        by_name = {r.replica_id.unique_id: r for r in candidates}
        preferred = by_id.get(self.sessions.get(session)) or by_name[rendezvous(session, list(by_name))]
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
