"""Evaluation statistics as an integer vector whose sum over devices is every scope's pooled statistics.

The coordinator names the scopes of a round (all devices, each persona, cold/warm, each activity bucket, each
served version); a device writes its bounded statistics (error sums, held-out count, 1 for "users") into every
scope it belongs to and zeros into the others, so under secure aggregation the masked vector says nothing about
which scopes are its own, and the unmasked sum is exactly what the plain evaluation pools per scope.

Each field has a public bound: a device's value is clipped to [0, bound] and quantised over [-bound, bound] with
Flower's stochastic quantisation (as `common.kslot`), so one device moves a scope's field by at most its bound.
"""

from __future__ import annotations

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize

# Ratings are 1-5, so one held-out rating's error is at most 4 (absolute) or 16 (squared).
MAX_HELD_OUT = 10_000  # held-out ratings one device may report (ML-100K's heaviest user has 737 ratings)
MAX_DISTANCE = 1_000.0  # L2 distance of a personal adapter from its persona's (~0.1-10 in real runs)
FIELDS = {"persona_sse": 16.0 * MAX_HELD_OUT, "persona_sae": 4.0 * MAX_HELD_OUT,
          "personal_sse": 16.0 * MAX_HELD_OUT, "personal_sae": 4.0 * MAX_HELD_OUT,
          "n": float(MAX_HELD_OUT), "users": 1.0, "personal_distance": MAX_DISTANCE,
          # the private bias model and the adapters' blend sums (`common.blend`), zeros from a device without them
          "blend_users": 1.0, "bias_sse": 16.0 * MAX_HELD_OUT, "bias_sae": 4.0 * MAX_HELD_OUT,
          "n_val": float(MAX_HELD_OUT),
          **{f"{path}_{held_out}_{k}": 16.0 * MAX_HELD_OUT for path in ("persona", "personal")
             for held_out in ("test", "val") for k in ("rd", "dd")},
          # per-user terms of the paired comparison with the private bias model (`paired_terms`): per-rating means,
          # so a rating's error bounds them (16 for a squared error, 256 for a product of two)
          "paired_users": 1.0,
          **{f"{path}_paired_{k}": bound for path in ("persona", "personal")
             for k, bound in (("e", 16.0), ("ee", 256.0), ("a", 16.0), ("b", 16.0), ("aa", 256.0), ("ab", 256.0),
                              ("bb", 256.0))}}
SIGNED = {f"{path}_{held_out}_rd" for path in ("persona", "personal") for held_out in ("test", "val")} | {
    f"{path}_paired_{k}" for path in ("persona", "personal") for k in ("e", "a", "ab")}
PAIRED_TERMS = ("e", "ee", "a", "b", "aa", "ab", "bb")


def paired_terms(values: dict[str, float]) -> dict[str, float]:
    """One device's terms of the paired comparison with the private bias model, per adapter: e = its MSE minus the
    bias model's on the device's test ratings; a = r.d / n, b = d.d / n (r = rating - bias, d = adapter - bias), so
    its blend at weight w differs from the bias model by -2 w a + w^2 b. Their sums and the sums of their products
    over devices give the mean and sd of the per-user differences: users weigh the same, as in the centralised
    tables. Needs n > 0 and the blend sums."""
    n = float(values["n"])
    out = {}
    for path in ("persona", "personal"):
        e = (float(values[f"{path}_sse"]) - float(values["bias_sse"])) / n
        a, b = float(values[f"{path}_test_rd"]) / n, float(values[f"{path}_test_dd"]) / n
        out.update({f"{path}_paired_{k}": v for k, v in
                    (("e", e), ("ee", e * e), ("a", a), ("b", b), ("aa", a * a), ("ab", a * b), ("bb", b * b))})
    return out
MAX_SCOPES = 256
# Evaluation is also pooled by how many training ratings a user has (cold-start users vs heavy users): that is
# where personas should matter most.
ACTIVITY_EDGES = (20, 50, 100, 200)


def activity_bucket(n_train: int) -> str:
    """'ratings_0_19', ..., 'ratings_200_plus': the scope name of a user with `n_train` training ratings."""
    lo = 0
    for hi in ACTIVITY_EDGES:
        if n_train < hi:
            return f"ratings_{lo}_{hi - 1}"
        lo = hi
    return f"ratings_{lo}_plus"


def clip_values(values: dict[str, float]) -> dict[str, float]:
    """A device's statistics within their bounds: n first, then error sums within what n ratings allow."""
    n = float(np.clip(values["n"], 0, MAX_HELD_OUT))
    out = {"n": n, "users": 1.0,
           "personal_distance": float(np.clip(values.get("personal_distance", 0.0), 0, MAX_DISTANCE))}
    for path in ("persona", "personal"):
        out[f"{path}_sse"] = float(np.clip(values[f"{path}_sse"], 0, 16.0 * n))
        out[f"{path}_sae"] = float(np.clip(values[f"{path}_sae"], 0, 4.0 * n))
    paired_fields = [f for f in FIELDS if "paired" in f]
    blend_fields = [f for f in FIELDS if f not in out and f != "blend_users" and f not in paired_fields]
    if all(f in values for f in blend_fields):
        n_val = float(np.clip(values["n_val"], 0, MAX_HELD_OUT))
        out.update(blend_users=1.0, n_val=n_val, bias_sse=float(np.clip(values["bias_sse"], 0, 16.0 * n)),
                   bias_sae=float(np.clip(values["bias_sae"], 0, 4.0 * n)))
        for f in blend_fields[3:]:
            count = n if "_test_" in f else n_val
            out[f] = float(np.clip(values[f], -16.0 * count if f in SIGNED else 0.0, 16.0 * count))
    else:
        out.update({f: 0.0 for f in (*blend_fields, "blend_users")})
    if out["blend_users"] and n > 0:  # computed from the clipped sums, so each stays within its bound
        out.update(paired_users=1.0, **paired_terms(out))
    else:
        out.update({f: 0.0 for f in paired_fields})
    return out


def encode(values: dict[str, float], own: list[str], scopes: list[str], levels: int) -> np.ndarray:
    """[scope 0: one value per FIELDS | scope 1 | ...], uint32: `values` in the `own` scopes, zeros elsewhere."""
    if not 1 <= len(scopes) <= MAX_SCOPES or len(set(scopes)) != len(scopes):
        raise ValueError(f"{len(scopes)} scopes (distinct, at most {MAX_SCOPES})")
    if levels < 2 or levels % 2 or levels > 1 << 30:
        raise ValueError(f"levels must be even and in [2, 2**30], got {levels}")
    clipped = clip_values(values)
    mine = np.array([s in own for s in scopes])
    columns = []
    for field, bound in FIELDS.items():
        column = np.where(mine, clipped[field], 0.0)
        columns.append(quantize([column], bound, levels)[0].astype(np.uint32))
    return np.stack(columns, axis=1).ravel()


def decode(total: np.ndarray, devices: int, scopes: list[str], levels: int) -> dict[str, dict[str, float]]:
    """Per scope, the pooled statistics of the `devices` whose vectors were summed. Raises ValueError for a sum
    no honest devices could produce (a wrong length, user counts that are not integers in [0, devices], or not
    `devices` in the first scope, which every device belongs to)."""
    if total.shape != (len(scopes) * len(FIELDS),):
        raise ValueError(f"the sum has shape {total.shape}, expected ({len(scopes) * len(FIELDS)},)")
    table = total.reshape(len(scopes), len(FIELDS)).astype(np.int64)
    out = {}
    for i, scope in enumerate(scopes):
        row = {}
        for j, (field, bound) in enumerate(FIELDS.items()):
            row[field] = float(dequantize([table[i, j:j + 1]], bound, levels)[0][0] - (devices - 1) * bound)
        users = round(row["users"])
        if abs(row["users"] - users) > 0.01 or not 0 <= users <= devices:
            raise ValueError(f"scope {scope!r} pools {row['users']:.3f} devices of {devices}")
        row["users"] = users
        # Rounding can leave a small negative where the true sum is zero.
        tolerance = devices * 2.0 / levels
        row = {k: (max(v, 0.0) if k not in SIGNED and v > -tolerance * FIELDS[k] else v) for k, v in row.items()}
        out[scope] = row
    if out[scopes[0]]["users"] != devices:
        raise ValueError(f"the first scope pools {out[scopes[0]]['users']} devices, not {devices}")
    return out
