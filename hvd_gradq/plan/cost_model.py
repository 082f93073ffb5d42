"""Cost model of the three ways a compressed layer can cross the ranks; pure arithmetic.

For a layer the model predicts, per rank, the bytes handed to Horovod's collectives (the payload,
which the exchanges measure at the call) and the bytes the usual algorithms put on the network,
and from those and a latency/bandwidth ``LinkModel`` (alpha-beta) a time:

* ``allreduce``  summable lanes of M bytes; ring allreduce: 2(N-1) steps, each rank sends and
                 receives 2(N-1)/N * M. Only codes that share one scale and level set can be summed,
                 and the lanes need log2(N) bits of headroom, so M grows slowly with N.
* ``allgather``  each rank's P-byte frame goes to every other rank: N-1 steps, each rank sends
                 and receives (N-1) * P. Works for any codec; receive cost grows with N.
* ``two_phase``  the layer is cut into N chunks (one per rank, aligned to the codec's buckets);
                 an alltoall sends chunk j to rank j (each rank sends and receives about
                 (N-1)/N * P), rank j sums and requantizes its chunk, and an allgather of the
                 requantized chunks follows (about (N-1)/N * P again): 2(N-1) steps, cost flat in N.
* ``lowrank``    low-rank factors of a matrix (PowerSGD): an allreduce of P (rows x r, float32),
                 then, once P is orthonormalised, an allreduce of Q (cols x r): two dependent ring
                 allreduces, 4(N-1) steps.
* ``none``       0-bit layer: nothing is sent.
* ``float32``    tiny layers: plain float32 allreduce (exact), priced like ``allreduce``.

The model knows nothing about bits; callers pass payload sizes from the codecs and ``wire``.
"""
from __future__ import annotations

from dataclasses import dataclass

from hvd_gradq import checks

NONE = "none"
FLOAT32 = "float32"
ALLREDUCE = "allreduce"
ALLGATHER = "allgather"
TWO_PHASE = "two_phase"
LOWRANK = "lowrank"
#: transports a compressed layer can use (``none``, ``float32`` and ``lowrank`` are fixed by the
#: layer and its codec)
TRANSPORTS = (ALLREDUCE, ALLGATHER, TWO_PHASE)


@dataclass(frozen=True)
class LinkModel:
    """Alpha-beta link: ``latency_s`` per message step, ``bandwidth`` bytes/s each way per rank."""

    latency_s: float = 50e-6
    bandwidth: float = 1.25e9  # 10 Gbit/s

    def __post_init__(self) -> None:
        for key in ("latency_s", "bandwidth"):
            checks.number(getattr(self, key), f"LinkModel.{key}", low=0)
        if self.bandwidth == 0:
            raise ValueError("LinkModel.bandwidth must be > 0 (bytes per second)")

    @classmethod
    def from_mbit(cls, mbit_per_s: float, latency_ms: float = 0.05) -> LinkModel:
        """A link of ``mbit_per_s`` Mbit/s and ``latency_ms`` per message step."""
        return cls(latency_s=latency_ms / 1e3, bandwidth=mbit_per_s * 1e6 / 8)


@dataclass(frozen=True)
class TransportCost:
    """Predicted cost of one layer's exchange, for one rank."""

    transport: str
    payload_bytes: int  # bytes handed to Horovod's collectives (all phases)
    sent_bytes: float  # bytes put on the network by the ring / pairwise algorithms
    received_bytes: float
    steps: int  # sequential message steps
    seconds: float


def _time(steps: int, sent: float, received: float, link: LinkModel) -> float:
    return steps * link.latency_s + max(sent, received) / link.bandwidth


def _check_size(size: int) -> None:
    checks.integer(size, "size (ranks in the process set)", low=1)


def allreduce_cost(payload_bytes: int, size: int, link: LinkModel, transport: str = ALLREDUCE) -> TransportCost:
    """Ring allreduce of a ``payload_bytes`` tensor."""
    _check_size(size)
    moved = 2 * (size - 1) / size * payload_bytes
    steps = 2 * (size - 1)
    return TransportCost(transport, payload_bytes, moved, moved, steps, _time(steps, moved, moved, link))


def then(first: TransportCost, second: TransportCost) -> TransportCost:
    """Two collectives one after the other (e.g. the block statistics, then the codes)."""
    return TransportCost(first.transport, first.payload_bytes + second.payload_bytes,
                         first.sent_bytes + second.sent_bytes, first.received_bytes + second.received_bytes,
                         first.steps + second.steps, first.seconds + second.seconds)


def allgather_cost(frame_bytes: int, size: int, link: LinkModel) -> TransportCost:
    """Allgather of one ``frame_bytes`` frame per rank (every rank receives N-1 of them)."""
    _check_size(size)
    moved = (size - 1) * frame_bytes
    steps = size - 1
    return TransportCost(ALLGATHER, frame_bytes, moved, moved, steps, _time(steps, moved, moved, link))


def two_phase_cost(chunk_frame_bytes: list[int], requant_frame_bytes: list[int], rank: int,
                   link: LinkModel) -> TransportCost:
    """Alltoall of per-chunk frames (``chunk_frame_bytes[j]`` goes to rank j, the same sizes from
    every rank), then an allgather of the requantized chunks (``requant_frame_bytes[j]`` from rank j)."""
    size = len(chunk_frame_bytes)
    _check_size(size)
    if len(requant_frame_bytes) != size or not 0 <= rank < size:
        raise ValueError("two_phase_cost needs one frame size per rank for both phases and 0 <= rank < N")
    own = chunk_frame_bytes[rank]
    sent1 = sum(chunk_frame_bytes) - own
    recv1 = (size - 1) * own
    sent2 = (size - 1) * requant_frame_bytes[rank]
    recv2 = sum(requant_frame_bytes) - requant_frame_bytes[rank]
    payload = sum(chunk_frame_bytes) + requant_frame_bytes[rank]
    steps = 2 * (size - 1)
    seconds = _time(size - 1, sent1, recv1, link) + _time(size - 1, sent2, recv2, link)
    return TransportCost(TWO_PHASE, payload, sent1 + sent2, recv1 + recv2, steps, seconds)


def lowrank_cost(p_bytes: int, q_bytes: int, size: int, link: LinkModel) -> TransportCost:
    """The two dependent allreduces of a low-rank layer: P (``p_bytes``), then Q (``q_bytes``)."""
    return then(allreduce_cost(p_bytes, size, link, LOWRANK), allreduce_cost(q_bytes, size, link, LOWRANK))


def none_cost() -> TransportCost:
    return TransportCost(NONE, 0, 0.0, 0.0, 0, 0.0)


def cheapest(costs: list[TransportCost]) -> TransportCost:
    """The lowest predicted time; ties go to the fewest payload bytes, then to list order."""
    if not costs:
        raise ValueError("no transport to choose from")
    return min(costs, key=lambda c: (c.seconds, c.payload_bytes))
