"""Privacy report: the federation at several privacy levels, utility against epsilon, and a membership attack.

    python -m simulations.privacy_report            # K=4; no DP, then user-level epsilon 1, 4, 8 (real SmolLM2-135M)
    python -m simulations.privacy_report --quick    # the federated simulation's --quick settings at each level

Each DP level sets `dp-user-target-epsilon` (central, user-level, per persona, discovery included) and turns on
on-device DP-SGD at `--device-noise` (example-level, per device, from its ledger), and reports both epsilons side by
side. The membership-inference check is a loss-threshold attack on the final persona adapters: members are users
whose device contributed to at least one round, non-members users whose device never did; the attack scores a
user by minus the mean cross-entropy of their training ratings under their persona's adapter. It reads the
simulated devices' encrypted stores, so this harness holds their key (`PERSONAFL_STORE_KEY`, set here).

Writes results/privacy/privacy.{md,csv,json} and privacy.png; library logging and warnings go to
results/privacy/privacy.log (the console shows progress and the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file
from tqdm.auto import tqdm

from client.client_app import load_state
from client.device import Device, runtime
from client.keys import KEY_ENV, RawKey
from client.store import EncryptedStore
from common.config import FederationConfig, ScoringConfig, split_preset
from common.data import load_movielens
from common.metrics import attack_advantage, attack_auc
from common.privacy import PrivacyLedger
from common.split import temporal_split
from simulations import console
from simulations.federated import QUICK, dp_level, run_federation


def membership_attack(cfg: FederationConfig, out: Path, devices: Path, key: RawKey, users: int, ratings: int,
                      seed: int = 0) -> dict:
    """Loss-threshold attack on the final persona adapters; AUC and advantage over member / non-member users."""
    labelled = []
    for node in sorted(devices.glob("node-*")):
        store = EncryptedStore(node, key)
        for user in store.users():
            state = load_state(store, user)
            if "persona" in state:
                labelled.append((int(user), int(state["persona"]), bool(state.get("contributed"))))
    rng = np.random.default_rng(seed)
    members = [u for u in labelled if u[2]]
    non_members = [u for u in labelled if not u[2]]
    pick = [members[i] for i in rng.permutation(len(members))[:users]] + \
           [non_members[i] for i in rng.permutation(len(non_members))[:users]]
    if not members or not non_members:
        return {"auc": float("nan"), "advantage": float("nan"), "members": len(members), "non_members": len(non_members)}

    adapters = {}
    for persona_dir in sorted((out / "personas").glob("p*")):
        latest = sorted(persona_dir.glob("r[0-9]*"))[-1]
        adapters[int(persona_dir.name[1:])] = load_file(str(latest / "adapter_model.safetensors"))
    data = load_movielens(cfg.dataset)
    split = temporal_split(data.ratings, split_preset(cfg.split))
    rt = runtime(cfg.base_model, cfg.lora)
    scores: dict[bool, list[float]] = {True: [], False: []}
    for user, persona, member in tqdm(pick, desc="membership attack", unit="user"):
        device = Device(user, data, split.train[split.train["user"] == user], split.test[split.test["user"] == user],
                        rt, ScoringConfig())
        scores[member].append(-float(device.train_losses(adapters[persona], ratings).mean()))
    return {"auc": attack_auc(scores[True], scores[False]), "advantage": attack_advantage(scores[True], scores[False]),
            "members": len(scores[True]), "non_members": len(scores[False])}


def user_epsilon(out: Path) -> float:
    """The largest user-level epsilon over the personas' latest versions (inf without central DP)."""
    worst = 0.0
    for persona_dir in (out / "personas").glob("p*"):
        privacy = json.loads((sorted(persona_dir.glob("r[0-9]*"))[-1] / "manifest.json").read_text())["privacy"]
        if not privacy.get("dp"):
            return float("inf")
        worst = max(worst, privacy["epsilon"])
    return worst


def example_epsilon(devices: Path, key: RawKey) -> float:
    """The largest example-level epsilon any device's ledger has spent (inf if devices trained without DP-SGD)."""
    spent = []
    for node in devices.glob("node-*"):
        store = EncryptedStore(node, key)
        for user in store.users():
            state = load_state(store, user)
            if state.get("contributed"):
                if not store.versions(user, "privacy-ledger"):
                    return float("inf")
                spent.append(PrivacyLedger.from_bytes(store.get_bytes(user, "privacy-ledger")).spent)
    return max(spent, default=0.0)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if np.isfinite(r["user_epsilon"])]
    plain = [r for r in rows if not np.isfinite(r["user_epsilon"])]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["user_epsilon"] for r in dp]
    for key, style, label in (("persona_rmse", "-o", "persona adapter"), ("personal_rmse", "--s", "personal adapter")):
        line, = ax.plot(x, [r[key] for r in dp], style, label=f"{label} (DP)")
        for r in plain:
            ax.axhline(r[key], color=line.get_color(), linestyle=":", label=f"{label}, no DP")
    ax.set_xscale("log")
    ax.set_xlabel("user-level epsilon (per persona)")
    ax.set_ylabel("held-out RMSE")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.plot(x, [r["mia_auc"] for r in dp], "-o", label="DP")
    for r in plain:
        ax2.axhline(r["mia_auc"], color="black", linestyle=":", label="no DP")
    ax2.axhline(0.5, color="grey", linewidth=0.8)
    ax2.set_xscale("log")
    ax2.set_xlabel("user-level epsilon (per persona)")
    ax2.set_ylabel("membership attack AUC")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict]) -> str:
    def eps(v):
        return "∞ (no DP)" if not np.isfinite(v) else f"{v:.2f}"

    lines = ["| level | user-level ε | example-level ε (max device) | persona RMSE | persona MAE | personal RMSE "
             "| personal MAE | attack AUC | attack advantage | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['level']} | {eps(r['user_epsilon'])} | {eps(r['example_epsilon'])} | {r['persona_rmse']:.4f} "
              f"| {r['persona_mae']:.4f} | {r['personal_rmse']:.4f} | {r['personal_mae']:.4f} | {r['mia_auc']:.3f} "
              f"| {r['mia_advantage']:.3f} | {r['wall_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the federated simulation's --quick settings")
    p.add_argument("--epsilons", default="1,4,8", help="user-level targets, comma-separated")
    p.add_argument("--personas", type=int, default=4)
    p.add_argument("--device-noise", type=float, default=1.0, help="DP-SGD noise multiplier on devices at DP levels")
    p.add_argument("--mia-users", type=int, default=16, help="members and non-members each, at most")
    p.add_argument("--mia-ratings", type=int, default=24, help="training ratings per attacked user, at most")
    p.add_argument("--no-plain", action="store_true", help="skip the no-DP level")
    p.add_argument("--out", default="results/privacy")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    args = p.parse_args(argv)
    with console.session(Path(args.out) / "privacy.log"):

        overrides = dict(QUICK) if args.quick else {}
        overrides.update(item.partition("=")[::2] for item in args.set)
        overrides["num-personas"] = args.personas
        cfg = FederationConfig.from_run_config(overrides)
        nodes = len(temporal_split(load_movielens(cfg.dataset).ratings, split_preset(cfg.split)).users)
        key = RawKey.generate()
        os.environ[KEY_ENV] = key.raw.hex()  # the simulated devices' store key, so this harness can read their stores

        out = Path(args.out)
        rows = []
        levels = [] if args.no_plain else [("no DP", "none", None)]
        levels += [(f"ε={e}", f"eps{e}", float(e)) for e in args.epsilons.split(",") if e.strip()]
        for name, slug, target in levels:
            print(f"\n=== privacy level: {name} ===")
            level = {**overrides, "out-dir": str(out / slug), "device-dir": str(out / "devices" / slug)}
            if target is not None:
                level.update(dp_level(target, args.device_noise))
            start = time.perf_counter()
            history = run_federation(level, nodes)
            last = history["evaluate"][max(history["evaluate"], key=int)]
            run_cfg = FederationConfig.from_run_config(level)
            mia = membership_attack(run_cfg, Path(run_cfg.out_dir), Path(run_cfg.device_dir), key, args.mia_users,
                                    args.mia_ratings, cfg.seed)
            rows.append({"level": name, "user_epsilon": user_epsilon(Path(run_cfg.out_dir)),
                         "example_epsilon": example_epsilon(Path(run_cfg.device_dir), key),
                         **{k: last[k] for k in ("persona_rmse", "persona_mae", "personal_rmse", "personal_mae")},
                         "eval_users": round(last["users"]), "mia_auc": mia["auc"], "mia_advantage": mia["advantage"],
                         "mia_members": mia["members"], "mia_non_members": mia["non_members"],
                         "wall_s": time.perf_counter() - start})
            print(markdown(rows[-1:]))

        table = markdown(rows)
        print("\n" + table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "privacy.md").write_text(table + "\n")
        pd.DataFrame(rows).to_csv(out / "privacy.csv", index=False)
        (out / "privacy.json").write_text(json.dumps({"overrides": overrides, "device_noise": args.device_noise,
                                                      "rows": rows}, indent=2, default=str))
        plot(rows, out / "privacy.png")
        print(f"\nwrote {out}/privacy.{{md,csv,json}} and {out}/privacy.png")


if __name__ == "__main__":
    main()
