"""Do personas separate users' rating behaviour? Measured without the language model, in seconds.

Personas can only pay for themselves (issue #17, goal 2) if the users grouped together rate alike in a way the
rest of the population does not. This script measures that for each way of forming K personas, on the same users
and over several k-means seeds:

- **separation**: the between-persona share of the variance of users' per-genre rating deviations (their mean
  rating in a genre minus their own mean, from training ratings, shrunk towards 0 for genres they rated little).
  0 means the personas are no better than one group; random groups of the same sizes give about (K-1)/(users-1).
- **payoff**: test RMSE of a persona-level item model, the classical analogue of a persona adapter. "warm" is
  mu + b_user + b_item + b_(persona,item); "cold" (the cold-start serving path: no user bias) is
  mu + b_item + b_(persona,item). Persona-item biases are fitted on training residuals and shrunk towards 0, so
  K=1 is user+item bias (warm) or item bias (cold) plus one global residual term. Each K is compared with K=1 on the same users, paired:
  the mean of per-user differences of squared error, with a 95% interval. A last row, `each user`, puts every
  user in a persona of their own: the most a taste term of this kind can gain (a personal genre/item bias).

`--base mf` measures the same on top of what the federation's adapters now correct (`item-factors-rounds`):
federated MF without noise (`common.item_factors`, the LM-free rounds of `simulations.item_factors`). "warm" is
MF with the user's own factors (the persona term is fitted on out-of-fold residuals, as a device's training targets
are: `client.device.Device.training_bases`), "cold" is MF's item half alone (mu + b_item: a user with no factors).
MF's user factors already carry each user's taste, so this is what a persona adapter can add over one shared
adapter on that base.

Groupings:
- `profile-embedding`: what the federation's discovery does today (all-MiniLM-L6-v2 embeddings of the prompt's
  profile text, Lloyd iterations from a random partition: the same math as federated k-means, without DP noise).
- `genre-deviation`: the same Lloyd iterations on the per-genre deviation vectors, as the federation's
  `discovery-features = "genre-deviation"` devices send them (`common.personas.genre_deviation`: halved and
  clipped to norm 1).
- `random`: a seeded random partition (the floor).

With `--dp-epsilon 8` the same groupings are formed again under the coordinator's user-level DP noise (issue #17,
goal 3: does private discovery find more than one non-empty persona?).

`python -m simulations.persona_separation [--split paper] [--ks 2,4,8] [--seeds 5] [--iters 4] [--dp-epsilon 8]`
prints a table
and writes `results/persona_separation/results.{md,json}`. Nothing here is tuned on test ratings: the shrinkage
constants are fixed a priori (the same as the user+item bias baseline's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import split_preset
from common.data import load_movielens
from common.personas import genre_deviation, initial_slot, nearest, update_centroids
from common.split import temporal_split
from simulations.classical import Biases

GENRE_SHRINK = 3.0  # pseudo-ratings at the user's own mean added to each genre: a genre rated once says little
PERSONA_ITEM_REG = 10.0  # same shrinkage as the item biases of the user+item bias baseline


def genre_deviations(train: pd.DataFrame, items: pd.DataFrame, users: np.ndarray) -> np.ndarray:
    """users x genres: shrunk mean deviation of a user's ratings in each genre from their own mean."""
    genres = sorted({g for gs in items["genres"] for g in gs})
    col = {g: j for j, g in enumerate(genres)}
    row = {u: i for i, u in enumerate(users)}
    dev = train["rating"] - train.groupby("user")["rating"].transform("mean")
    sums = np.zeros((len(users), len(genres)))
    counts = np.zeros_like(sums)
    for u, item, d in zip(train["user"].to_numpy(), train["item"].to_numpy(), dev.to_numpy()):
        for g in items.at[item, "genres"]:
            sums[row[u], col[g]] += d
            counts[row[u], col[g]] += 1
    return sums / (counts + GENRE_SHRINK)


def lloyd(x: np.ndarray, users: np.ndarray, k: int, iters: int, seed: int, noise_std: float = 0.0) -> np.ndarray:
    """Federated k-means' math on one machine: random-partition start from a seeded hash of the user id, then
    `iters` rounds of nearest-centroid assignment and slot means (an empty slot keeps its centroid).

    `noise_std` > 0 is the coordinator's user-level Gaussian mechanism on each of the iters + 1 slot sums: every
    user's (vector, count) contribution has norm <= EMBED_BOUND (vectors of norm <= 1, as devices send them) and
    each summed coordinate, counts included, gets N(0, noise_std) (seeded here: a measurement, not a release)."""
    rng = np.random.default_rng([seed, 1])
    labels = np.array([initial_slot(int(u), k, seed) for u in users])
    centroids = None
    for _ in range(iters + 1):
        sums = np.zeros((k, x.shape[1]))
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k).astype(float)
        if noise_std > 0:
            sums, counts = sums + rng.normal(0, noise_std, sums.shape), counts + rng.normal(0, noise_std, k)
        centroids = update_centroids(sums, counts, centroids)
        labels = np.array([nearest(v, centroids) for v in x])
    return labels


def discovery_noise_std(epsilon: float, users: int, k: int, iters: int, rounds: int, sample_rate: float) -> float:
    """The std the coordinator adds to each discovery sum for a user-level target `epsilon` per persona, from its
    own privacy plan (`server.server_app.privacy_plan`: discovery and item-statistics releases, then `rounds`
    persona releases at `sample_rate`), with iters + 1 k-means releases as `lloyd` makes them."""
    from common.config import FederationConfig
    from server.server_app import EMBED_BOUND, privacy_plan

    cfg = FederationConfig(num_personas=k, kmeans_iters=iters + 1, num_rounds=rounds, fraction_train=sample_rate,
                           dp_user_target_epsilon=epsilon, item_stats=True, discovery_features="genre-deviation")
    return privacy_plan(cfg, users)[1] * EMBED_BOUND


def separation(x: np.ndarray, labels: np.ndarray) -> float:
    """Between-group share of the total sum of squares of `x` (1 - within / total)."""
    total = ((x - x.mean(0)) ** 2).sum()
    within = sum(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum() for j in np.unique(labels))
    return float(1 - within / total) if total > 0 else 0.0


def bias_base(train: pd.DataFrame, test: pd.DataFrame, warm: bool) -> tuple[np.ndarray, np.ndarray]:
    """(training, test) predictions of mu (+ b_user if warm) + b_item, the user+item bias baseline's model."""
    base = Biases().fit(train)
    bu = base.bu if warm else {}

    def fitted(df: pd.DataFrame) -> np.ndarray:
        return (base.mu + df["user"].map(bu).fillna(0.0).to_numpy()
                + df["item"].map(base.bi).fillna(0.0).to_numpy())
    return fitted(train), fitted(test)


def mf_bases(train: pd.DataFrame, test: pd.DataFrame, n_items: int, rounds: int, reg: float, prior: float,
             rank: int = 32, folds: int = 5) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """{warm: (training, test) predictions} of federated MF without noise. Warm training predictions are out of
    fold (user factors fitted on the user's other ratings, as `Device.training_bases` does), test ones from all
    of the user's training ratings; cold is the item half alone."""
    from argparse import Namespace

    from common.item_factors import fit_user, out_of_fold, predict, zero_user
    from simulations.item_factors import federate

    model, _ = federate(train, n_items, rounds, 0.0, Namespace(rank=rank, lr=0.02, bound=1.0), 0, reg, prior)
    cold = zero_user(model)
    cold_train, cold_test = (predict(cold, df["item"].to_numpy(), model) for df in (train, test))
    # a test user without training ratings is a cold-start user: the item half alone, warm or not
    warm_train, warm_test = np.empty(len(train)), cold_test.copy()
    test_rows = test.groupby("user").indices
    for u, idx in train.groupby("user").indices.items():
        items, ratings = train["item"].to_numpy()[idx], train["rating"].to_numpy()[idx]
        warm_train[idx] = out_of_fold(items, ratings, model, reg, prior, folds, seed=int(u))
        if u in test_rows:
            t = test_rows[u]
            warm_test[t] = predict(fit_user(items, ratings, model, reg, prior), test["item"].to_numpy()[t], model)
    return {True: (warm_train, warm_test), False: (cold_train, cold_test)}


def persona_errors(train: pd.DataFrame, test: pd.DataFrame, items: pd.DataFrame, persona: dict, warm: bool,
                   level: str, bases: dict | None = None) -> np.ndarray:
    """Per-test-rating squared errors of a base model plus a persona term, clipped to 1..5. The base is mu
    (+ b_user if warm) + b_item, or `bases[warm]` = (training, test) predictions of another model (`mf_bases`).

    level "item": b_(persona,item); level "genre": the mean of b_(persona,genre) over the movie's genres. Both are
    fitted on training residuals of the K=1 model and shrunk towards 0."""
    on_train, on_test = bases[warm] if bases is not None else bias_base(train, test, warm)
    res = train.assign(p=train["user"].map(persona), r=train["rating"].to_numpy() - on_train)
    keys_test = test.assign(p=test["user"].map(persona))
    if level == "genre":
        res = res.assign(key=items.loc[res["item"], "genres"].to_numpy()).explode("key")
        keys_test = keys_test.assign(key=items.loc[keys_test["item"], "genres"].to_numpy()).explode("key")
    else:
        res, keys_test = res.assign(key=res["item"]), keys_test.assign(key=keys_test["item"])
    g = res.groupby(["p", "key"])["r"]
    bias = g.sum() / (g.size() + PERSONA_ITEM_REG)
    terms = pd.Series([bias.get((p, k), 0.0) for p, k in zip(keys_test["p"], keys_test["key"])],
                      index=keys_test.index)
    extra = terms.groupby(level=0).mean().reindex(test.index).fillna(0.0).to_numpy()
    pred = np.clip(on_test + extra, 1.0, 5.0)
    return (pred - test["rating"].to_numpy()) ** 2


MODELS = (("warm", "item"), ("warm", "genre"), ("cold", "item"), ("cold", "genre"))


def paired(a: np.ndarray, b: np.ndarray, users: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% interval over users of (per-user MSE of a) - (per-user MSE of b)."""
    d = pd.Series(a - b).groupby(users).mean().to_numpy()
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def run(split: str = "paper", ks: tuple[int, ...] = (2, 4, 8), seeds: int = 5, iters: int = 4,
        groupings: tuple[str, ...] = ("profile-embedding", "genre-deviation", "random"),
        data=None, dp_epsilon: float = 0.0, dp_rounds: int = 5, dp_sample_rate: float = 0.06,
        mf: tuple[int, float, float] | None = None) -> list[dict]:
    """With `dp_epsilon` > 0 the profile-embedding and genre-deviation groupings are formed again under the
    coordinator's user-level DP noise for that epsilon (rows "<grouping>, user-level DP ε=<e>"), every user of
    the split contributing (the federation's cold-start devices send zeros instead; the paper split has none).
    With `mf` = (rounds, penalty, prior count) the base is federated MF (`mf_bases`) instead of the bias model."""
    data = data if data is not None else load_movielens("ml-100k")
    sp = temporal_split(data.ratings, split_preset(split))
    train, test = sp.train, sp.test
    users = np.sort(train["user"].unique())
    test = test[test["user"].isin(users)].reset_index(drop=True)
    x_genre = genre_deviations(train, data.items, users)
    # What the federation's `discovery-features = "genre-deviation"` devices send (scaled, clipped to norm 1).
    genres = tuple(sorted({g for gs in data.items["genres"] for g in gs}))
    by_user = dict(tuple(train.groupby("user")))
    features = {"genre-deviation": np.stack([genre_deviation(by_user[u], data.items, genres) for u in users])}
    if "profile-embedding" in groupings:
        from common.personas import embed_profiles
        from common.prompt import user_profile

        features["profile-embedding"] = embed_profiles([user_profile(by_user[u], data.items) for u in users])
    bases = mf_bases(train, test, int(data.items.index.max()), *mf) if mf else None
    one = {u: 0 for u in users}
    base = {(w, lv): persona_errors(train, test, data.items, one, w == "warm", lv, bases) for w, lv in MODELS}
    rows = []
    private = [(f"{g}, user-level DP ε={dp_epsilon:g}", g) for g in groupings if g != "random"] if dp_epsilon else []
    for name, source in [(g, g) for g in groupings] + private:
        for k in ks:
            noise = discovery_noise_std(dp_epsilon, len(users), k, iters, dp_rounds, dp_sample_rate) \
                if name != source else 0.0
            per_seed = []
            for seed in range(seeds):
                if name == "random":
                    labels = np.random.default_rng(seed).integers(0, k, len(users))
                else:
                    labels = lloyd(features[source], users, k, iters, seed, noise)
                persona = dict(zip(users, labels))
                sizes = np.bincount(labels, minlength=k)
                out = {"separation": separation(x_genre, labels), "sizes": sizes.tolist(),
                       "non_empty": int((sizes > 0).sum()), **({"noise_std": noise} if noise else {})}
                for w, lv in MODELS:
                    err = persona_errors(train, test, data.items, persona, w == "warm", lv, bases)
                    out[f"rmse_{w}_{lv}"] = float(np.sqrt(err.mean()))
                    out[f"diff_{w}_{lv}"] = paired(err, base[(w, lv)], test["user"].to_numpy())
                per_seed.append(out)
            row = {"grouping": name, "k": k, "users": len(users), "test_ratings": len(test), "seeds": per_seed}
            for key in ("separation", "non_empty") + tuple(f"rmse_{w}_{lv}" for w, lv in MODELS):
                vals = np.array([s[key] for s in per_seed])
                row[key] = float(vals.mean())
                row[key + "_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            rows.append(row)
    first = {"grouping": "one persona", "k": 1, "users": len(users), "test_ratings": len(test),
             "separation": 0.0, "separation_sd": 0.0, "non_empty": 1.0, "non_empty_sd": 0.0, "seeds": []}
    for w, lv in MODELS:
        first[f"rmse_{w}_{lv}"], first[f"rmse_{w}_{lv}_sd"] = float(np.sqrt(base[(w, lv)].mean())), 0.0
    rows.insert(0, first)
    own = {u: i for i, u in enumerate(users)}
    last = {"grouping": "each user", "k": len(users), "users": len(users), "test_ratings": len(test),
            "separation": 1.0, "separation_sd": 0.0, "non_empty": float(len(users)), "non_empty_sd": 0.0,
            "seeds": [{}]}
    for w, lv in MODELS:
        err = persona_errors(train, test, data.items, own, w == "warm", lv, bases)
        last[f"rmse_{w}_{lv}"], last[f"rmse_{w}_{lv}_sd"] = float(np.sqrt(err.mean())), 0.0
        last["seeds"][0][f"diff_{w}_{lv}"] = paired(err, base[(w, lv)], test["user"].to_numpy())
    rows.append(last)
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(row, w, lv):
        text = f"{row[f'rmse_{w}_{lv}']:.4f} +- {row[f'rmse_{w}_{lv}_sd']:.4f}"
        if row["seeds"]:
            # the interval of the median seed by mean difference (every seed's interval is in the JSON)
            diffs = sorted((s[f"diff_{w}_{lv}"] for s in row["seeds"]), key=lambda d: d[0])
            m, lo, hi = diffs[len(diffs) // 2]
            text += f" ({m:+.3f} [{lo:+.3f}, {hi:+.3f}])"
        return text

    head = " | ".join(f"{w} {lv}: RMSE (MSE diff vs K=1 [95% CI])" for w, lv in MODELS)
    lines = [f"| grouping | K | non-empty personas | separation | {head} |",
             "|---|---:|---:|---:|" + "---:|" * len(MODELS)]
    for r in rows:
        lines.append(f"| {r['grouping']} | {r['k']} | {r['non_empty']:.1f} | "
                     f"{r['separation']:.3f} +- {r['separation_sd']:.3f} | "
                     + " | ".join(cell(r, w, lv) for w, lv in MODELS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="paper")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4, help="Lloyd iterations (the federation's kmeans-iters)")
    ap.add_argument("--dp-epsilon", type=float, default=0.0,
                    help="also form the personas under the coordinator's user-level DP for this target epsilon "
                         "per persona (discovery, item statistics and --dp-rounds persona releases accounted)")
    ap.add_argument("--dp-rounds", type=int, default=5, help="persona releases the epsilon also covers")
    ap.add_argument("--dp-sample-rate", type=float, default=0.06, help="the federation's fraction-train")
    ap.add_argument("--groupings", default="profile-embedding,genre-deviation,random")
    ap.add_argument("--base", choices=("bias", "mf"), default="bias",
                    help="the model the persona term corrects: user+item bias, or federated MF (no noise)")
    ap.add_argument("--mf", default="20,0.2,0",
                    help="with --base mf: rounds, per-rating penalty, prior count (simulations.item_factors' "
                         "validation choices: 20,0.2,0 on the paper split, 20,0.1,50 on the default split)")
    ap.add_argument("--out", default="results/persona_separation")
    args = ap.parse_args(argv)
    t0 = time.time()
    rounds, reg, prior = args.mf.split(",")
    rows = run(args.split, tuple(int(k) for k in args.ks.split(",")), args.seeds, args.iters,
               tuple(args.groupings.split(",")), dp_epsilon=args.dp_epsilon, dp_rounds=args.dp_rounds,
               dp_sample_rate=args.dp_sample_rate,
               mf=(int(rounds), float(reg), float(prior)) if args.base == "mf" else None)
    table = markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table)
    print(f"\n{rows[0]['users']} users, {rows[0]['test_ratings']} test ratings, split {args.split}, "
          f"base {args.base}, {args.seeds} seeds, {time.time() - t0:.0f} s; written to {out}/")


if __name__ == "__main__":
    main()
