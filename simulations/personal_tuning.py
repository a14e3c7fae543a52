"""Does fine-tuning the persona adapter on a user's own ratings pay, and with which steps and learning rate?

A personal adapter is the persona adapter fine-tuned on the device (`personal-steps` at `personal-lr`). This script
takes a finished K=1 federation's released persona adapter and, for every evaluation user, fine-tunes it exactly as
that user's device would (its training ratings without the validation hold-out, the run's prompts, released item
statistics and, with `residual-to-bias`, prior) for each setting of a grid, then scores the user's validation and
test ratings. The setting is chosen on the pooled validation ratings (never on test ratings); every setting's test
RMSE and its paired per-user comparison with the private bias model, user+item bias and MF are printed beside it,
so the choice can be checked. One more row keeps, per device, whichever setting has the lowest error on that device's
own validation ratings (what a device could decide alone, before serving).

    python -m simulations.personal_tuning results/federated/k1 --steps 2,8 --lrs 2e-3,3e-4

Writes <run>/personal_tuning.{md,json}. Steps 0 is the persona adapter itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from common.metrics import rmse
from simulations.centralised import paired_vs
from simulations.rescore import FinishedRun, baselines, load_run

PERSONA = "persona adapter (0 steps)"


def setting_name(steps: int, lr: float) -> str:
    return PERSONA if steps == 0 else f"{steps} steps at lr {lr:g}"


def tune(run: FinishedRun, steps: list[int], lrs: list[float]) -> dict:
    """Every setting's validation and test predictions for every evaluation user, in the devices' order."""
    settings = [(0, 0.0)] + [(s, lr) for lr in lrs for s in steps if s > 0]
    pred = {setting_name(*s): {"val": [], "test": []} for s in settings}
    bias = {"val": [], "test": []}
    y_val, who_val = [], []
    start = time.perf_counter()
    for i, user in enumerate(run.users):
        device = run.device(user)
        persona = run.arrays[run.persona(device)]
        for s, lr in settings:
            arrays = persona
            if s:
                arrays, _ = device.train_adapter(persona, dataclasses.replace(run.cfg.train(s), lr=lr))
            for held_out in ("val", "test"):
                pred[setting_name(s, lr)][held_out].append(device.predict(arrays, held_out))
        for held_out in ("val", "test"):
            bias[held_out].append(device.bias(held_out))
        val = run.val[run.val["user"] == user]
        y_val.append(val["rating"].to_numpy(float))
        who_val.append(np.full(len(val), user))
        print(f"  user {user} ({i + 1}/{len(run.users)}): {len(val)} validation, {len(pred[PERSONA]['test'][-1])} "
              f"test ratings, {time.perf_counter() - start:.0f} s", flush=True)
    who, y = run.test["user"].to_numpy(), run.test["rating"].to_numpy(float)
    return {"run": str(run.out), "seed": run.cfg.seed, "who": who, "y": y,
            "who_val": np.concatenate(who_val), "y_val": np.concatenate(y_val),
            "pred": {k: {h: np.concatenate(v[h]) for h in v} for k, v in pred.items()},
            "private bias": {h: np.concatenate(v) for h, v in bias.items()},
            **baselines(run, who, run.test["item"])}


def chosen(result: dict) -> str:
    """The setting with the lowest pooled validation RMSE."""
    return min(result["pred"], key=lambda k: rmse(result["pred"][k]["val"], result["y_val"]))


PER_USER = "each device's own choice on its validation ratings"


def per_user_choice(result: dict) -> dict[str, np.ndarray]:
    """What a device would serve if it kept, of the persona adapter and its fine-tuned settings, the one with the
    lowest squared error on its own validation ratings (ties and devices without any: the persona adapter, the
    first setting). Chosen on validation only: its test predictions are then an honest estimate."""
    names = list(result["pred"])
    out = {h: result["pred"][names[0]][h].copy() for h in ("val", "test")}
    for user in np.unique(result["who"]):
        in_val, in_test = result["who_val"] == user, result["who"] == user
        if not in_val.any():
            continue
        errors = [float(((result["pred"][n]["val"][in_val] - result["y_val"][in_val]) ** 2).sum()) for n in names]
        best = names[int(np.argmin(errors))]  # argmin: the first of equals
        for h, mask in (("val", in_val), ("test", in_test)):
            out[h][mask] = result["pred"][best][h][mask]
    return out


def table(result: dict) -> str:
    y, who = result["y"], result["who"]
    best = chosen(result)

    def vs(err, other) -> str:
        d = paired_vs(err, (other - y) ** 2, who)
        return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"

    lines = [f"{len(np.unique(who))} users, {len(y)} test and {len(result['y_val'])} validation ratings; private "
             f"bias model: validation {rmse(result['private bias']['val'], result['y_val']):.4f}, test "
             f"{rmse(result['private bias']['test'], y):.4f}; user+item bias {rmse(result['user+item bias'], y):.4f}, "
             f"MF {rmse(result['matrix factorisation'], y):.4f} (test)", "",
             "| setting | validation RMSE | test RMSE | vs private bias [95% CI] | vs user+item bias | vs MF |",
             "|---|---:|---:|---|---|---|"]
    for name, p in {**result["pred"], PER_USER: per_user_choice(result)}.items():
        err = (p["test"] - y) ** 2
        mark = " (chosen on validation)" if name == best else ""
        lines.append(f"| {name}{mark} | {rmse(p['val'], result['y_val']):.4f} | {rmse(p['test'], y):.4f} | "
                     f"{vs(err, result['private bias']['test'])} | {vs(err, result['user+item bias'])} | "
                     f"{vs(err, result['matrix factorisation'])} |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="coordinator out-dir of a finished K=1 federation (history.json inside)")
    ap.add_argument("--steps", default="2,8", help="personal steps to try, comma-separated")
    ap.add_argument("--lrs", default="2e-3,3e-4", help="personal learning rates to try, comma-separated")
    ap.add_argument("--eval-users", type=int, default=None, help="users to tune on (default: the run's own)")
    args = ap.parse_args(argv)
    run = load_run(Path(args.run), args.eval_users)
    result = tune(run, [int(s) for s in _floats(args.steps)], _floats(args.lrs))
    text = table(result)
    print("\nPersonal fine-tuning of the released persona adapter, per setting:\n\n" + text)
    (run.out / "personal_tuning.md").write_text(text + "\n")
    (run.out / "personal_tuning.json").write_text(json.dumps(
        {"run": result["run"], "seed": result["seed"], "chosen": chosen(result),
         "test_rmse": {k: rmse(p["test"], result["y"]) for k, p in result["pred"].items()},
         "per_user_choice_test_rmse": rmse(per_user_choice(result)["test"], result["y"]),
         "val_rmse": {k: rmse(p["val"], result["y_val"]) for k, p in result["pred"].items()}}, indent=1))


if __name__ == "__main__":
    main()
