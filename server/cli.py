"""Coordinator admin CLI: start the admin API, or call it for the common rollout actions.

    python -m server.cli serve --root results/federated/k4 --tokens tokens.json [--cold-start] [--port 8600]
                                                        # operator's web page: http://127.0.0.1:8600/dashboard
    python -m server.cli personas                       # the calls read PERSONAFL_ADMIN_URL / PERSONAFL_ADMIN_TOKEN
    python -m server.cli versions --persona 2
    python -m server.cli canary 2 17 --percent 10 --reason "round 17 looks better offline"
    python -m server.cli promote 2
    python -m server.cli rollback 2 --reason "complaints"
    python -m server.cli pause 2
    python -m server.cli events
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def serve(args) -> None:
    import uvicorn

    from server.admin_api import create_app
    from server.auth import TokenConfigError, TokenStore
    from server.registry import PersonaRegistry

    try:
        tokens = TokenStore.from_file(Path(args.tokens)) if args.tokens else TokenStore.from_env()
    except TokenConfigError as e:
        sys.exit(f"serve: {e}")
    registry = PersonaRegistry(args.root, url=args.db_url)
    serving = None
    if args.cold_start:
        # Checked before the base model is loaded, with a message instead of a traceback.
        base_model = args.base_model
        if base_model is None:
            first = registry.versions(limit=1)[0]
            if not first:
                sys.exit(f"serve --cold-start: the registry at {args.root} has no persona version yet, so neither a "
                         "base model nor an adapter to serve; run the federation first, or pass --base-model")
            base_model = first[0]["manifest"]["base_model"]
        from server.serving import ONBOARDING_FILE

        if not (registry.root / ONBOARDING_FILE).is_file():
            sys.exit(f"serve --cold-start: {registry.root / ONBOARDING_FILE} is missing (the ServerApp writes the "
                     "aggregated onboarding counts there)")
        from common.data import load_movielens
        from server.serving import ColdStartService

        serving = ColdStartService(registry, base_model, load_movielens(args.dataset).items,
                                   max_resident=args.max_resident)
    uvicorn.run(create_app(registry, tokens, serving), host=args.host, port=args.port)


def call(args) -> None:
    import httpx

    url = args.url or os.environ.get("PERSONAFL_ADMIN_URL", "http://127.0.0.1:8600")
    token = args.token or os.environ.get("PERSONAFL_ADMIN_TOKEN")
    if not token:
        sys.exit("no token: pass --token or set PERSONAFL_ADMIN_TOKEN")
    if args.command in ("personas", "versions", "events"):
        method, path, body = "GET", f"/{args.command}", None
        params = {"persona": args.persona} if args.persona is not None else {}
    else:
        method, path, params = "POST", f"/personas/{args.persona}/{args.command}", {}
        body = {"reason": args.reason}
        if args.command == "canary":
            body.update(version=args.version, percent=args.percent)
    try:
        response = httpx.request(method, url + path, json=body, params=params,
                                 headers={"Authorization": f"Bearer {token}"}, timeout=60)
    except httpx.TransportError as e:
        sys.exit(f"cannot reach the admin API at {url}: {e}")
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:  # not JSON (a proxy's error page, say): show it as it is
        print(f"HTTP {response.status_code}: {response.text[:2000]}")
    if response.status_code >= 400:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the admin API (uvicorn)")
    s.add_argument("--root", required=True, help="the coordinator's out-dir (registry.db and persona versions)")
    s.add_argument("--db-url", help="a SQLAlchemy URL instead of <root>/registry.db")
    s.add_argument("--tokens", help="token file (JSON); default: PERSONAFL_ADMIN_TOKENS")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8600)
    s.add_argument("--cold-start", action="store_true", help="also serve /cold-start endpoints")
    s.add_argument("--dataset", default="ml-100k", help="movie catalogue for cold-start scoring")
    s.add_argument("--base-model", help="default: the registry's base model")
    s.add_argument("--max-resident", type=int, default=64)
    for name in ("personas", "versions", "events"):
        c = sub.add_parser(name)
        c.add_argument("--persona", type=int)
    for name in ("canary", "promote", "rollback", "pause", "resume"):
        c = sub.add_parser(name)
        c.add_argument("persona", type=int)
        if name == "canary":
            c.add_argument("version", type=int)
            c.add_argument("--percent", type=float, required=True)
        c.add_argument("--reason", default="")
    for c in sub.choices.values():
        if c is not s:
            c.add_argument("--url", help="default: PERSONAFL_ADMIN_URL, else http://127.0.0.1:8600")
            c.add_argument("--token", help="default: PERSONAFL_ADMIN_TOKEN")
    args = p.parse_args(argv)
    serve(args) if args.command == "serve" else call(args)


if __name__ == "__main__":
    main()
