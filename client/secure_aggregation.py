"""The device's secure-aggregation messages (`common.secure_aggregation` is the protocol): each handler reads a
coordinator message, runs one stage, and answers with that stage's output only.

Between messages the protocol state (private keys, the self-mask seed, the plain K-slot vector until it is
masked) lives in Flower's `context.state`, in the node's memory for the run, never in the device's store; it is
deleted when the round ends or fails. A malformed or out-of-order request raises, and the ClientApp's guard
turns that into an error reply whose reason is a category (the device is then a dropout of that round).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common import kslot, scoped_sums, secure_vector
from common.secure_aggregation import Participant, ProtocolError
from common.timing import phase

STATE, VECTOR = "secagg", "secagg-vector"


def _forget(context: Context) -> None:
    for key in (STATE, VECTOR):
        if key in context.state:
            del context.state[key]


def _load(context: Context, message: Message) -> Participant:
    if STATE not in context.state:
        raise ProtocolError("no secure round is under way on this device")
    state = dict(context.state[STATE])
    config = message.content["config"] if "config" in message.content else ConfigRecord()
    if config.get("round") != state.pop("round"):
        _forget(context)  # a request for another round: this one cannot complete any more
        raise ProtocolError("the request is for another round")
    vector = context.state[VECTOR]["x"].numpy() if VECTOR in context.state else np.zeros(0, np.uint32)
    return Participant.from_state(state, vector)


def _save(context: Context, participant: Participant, round_id: int) -> None:
    context.state[STATE] = ConfigRecord({**participant.to_state(), "round": round_id})
    if participant.vector.size:
        context.state[VECTOR] = ArrayRecord({"x": Array(np.ascontiguousarray(participant.vector))})
    elif VECTOR in context.state:
        del context.state[VECTOR]


def _stage(context: Context, message: Message, run) -> RecordDict:
    """Run one stage on the saved participant; any failure ends this device's part in the round."""
    config = message.content["config"] if "config" in message.content else ConfigRecord()
    try:
        participant = _load(context, message)
        content = run(participant)
    except Exception:
        _forget(context)
        raise
    if participant.stage == "done":
        _forget(context)
    else:
        _save(context, participant, config["round"])
    return content


def begin(context: Context, node: int, vector: np.ndarray, threshold: int, round_id: int) -> ConfigRecord:
    """Start a round with this device's K-slot `vector`: its two public keys, for the train reply."""
    _forget(context)
    participant = Participant(node, vector, threshold)
    c, s = participant.advertise()
    _save(context, participant, round_id)
    return ConfigRecord({"c": c, "s": s})


@phase("device: secure aggregation")
def start(message: Message, context: Context, delta: dict[str, np.ndarray]) -> Message:
    """The train.secagg reply once `delta` is trained: the delta goes into the K-slot vector of the persona this
    device trained (held in memory), and only two public keys leave. No persona id, example count or train
    metric is sent: each is one device's value."""
    config = message.content["config"]
    vector = kslot.encode(delta, int(config["persona"]), int(config["secagg-k"]), float(config["secagg-clip"]),
                          float(config["secagg-range"]), int(config["secagg-levels"]))
    keys = begin(context, message.metadata.dst_node_id, vector, int(config["secagg-threshold"]),
                 config["secagg-round"])
    return Message(content=RecordDict({"metrics": MetricRecord({}), "secagg": keys}), reply_to=message)


@phase("device: secure aggregation")
def start_evaluation(message: Message, context: Context, values: dict) -> Message:
    """The evaluate.secagg reply: this device's statistics go into every scope it belongs to (all, its persona,
    cold or warm, its activity bucket, the version it was served) of the round's scoped vector; only two public
    keys leave. (`values` as a plain evaluation reply would carry them.)"""
    config = message.content["config"]
    scopes = config["secagg-scopes"]
    if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes):
        raise ProtocolError("secagg-scopes is not a list of names")
    own = ["all", f"p{int(config['persona'])}", "cold" if values["cold"] else "warm",
           scoped_sums.activity_bucket(int(values["num-examples"]))]
    if "version" in values:
        own.append(f"v{values['version']}")
    vector = scoped_sums.encode(values, own, list(scopes), int(config["secagg-levels"]))
    keys = begin(context, message.metadata.dst_node_id, vector, int(config["secagg-threshold"]),
                 config["secagg-round"])
    return Message(content=RecordDict({"metrics": MetricRecord({}), "secagg": keys}), reply_to=message)


@phase("device: secure aggregation")
def start_sums(message: Message, context: Context, arrays: list[np.ndarray]) -> Message:
    """A discovery query's reply under secure aggregation (k-means slot sums, per-movie statistics): the arrays,
    clipped to the coordinator's public bound on this device, go into a quantised vector held in memory for the
    round (`common.secure_vector`), and only two public keys leave."""
    config = message.content["config"]
    vector = secure_vector.encode(arrays, float(config["secagg-bound"]), int(config["secagg-levels"]))
    keys = begin(context, message.metadata.dst_node_id, vector, int(config["secagg-threshold"]),
                 config["secagg-round"])
    return Message(content=RecordDict({"metrics": MetricRecord({}), "secagg": keys}), reply_to=message)


def _node_map(record, what: str) -> dict[int, bytes]:
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(f"{what} is not a ConfigRecord")
    out = {}
    for key, value in record.items():
        prefix, _, node = key.rpartition("/")
        if not (node.isdigit() and len(node) <= 20 and isinstance(value, bytes)):
            raise ProtocolError(f"{what} has a malformed entry")
        out.setdefault(prefix, {})[int(node)] = value
    return out


@phase("device: secure aggregation")
def share(message: Message, context: Context) -> Message:
    maps = _node_map(message.content["keys"] if "keys" in message.content else None, "keys")
    c, s = maps.get("c", {}), maps.get("s", {})
    if set(maps) - {"c", "s"} or set(c) != set(s):
        raise ProtocolError("keys must list a 'c' and an 's' key for every participant")
    keys = {n: (c[n], s[n]) for n in c}
    content = _stage(context, message, lambda p: RecordDict(
        {"shares": ConfigRecord({str(n): ct for n, ct in p.share(keys).items()})}))
    return Message(content=content, reply_to=message)


@phase("device: secure aggregation")
def mask(message: Message, context: Context) -> Message:
    inbox = _node_map(message.content["inbox"] if "inbox" in message.content else None, "inbox")
    if set(inbox) - {""}:
        raise ProtocolError("inbox entries are keyed by node id only")
    content = _stage(context, message, lambda p: RecordDict(
        {"masked": ArrayRecord({"y": Array(np.ascontiguousarray(p.mask(inbox.get("", {}))))})}))
    return Message(content=content, reply_to=message)


def _ids(record: ConfigRecord, key: str) -> list[int]:
    values = record.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) and v.isdigit() and len(v) <= 20 for v in values):
        raise ProtocolError(f"{key} is not a list of node ids")
    return [int(v) for v in values]


@phase("device: secure aggregation")
def unmask(message: Message, context: Context) -> Message:
    nodes = message.content["nodes"] if "nodes" in message.content else None
    if not isinstance(nodes, ConfigRecord):
        raise ProtocolError("nodes is not a ConfigRecord")
    survivors, dropped = _ids(nodes, "survivors"), _ids(nodes, "dropped")
    content = _stage(context, message, lambda p: RecordDict(
        {"revealed": ConfigRecord({str(n): v for n, v in p.unmask(survivors, dropped).items()})}))
    return Message(content=content, reply_to=message)
