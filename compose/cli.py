"""The `switchyard` command: run the local stack, each process, and the admin chores."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from compose.children import stop_with_launcher
from topics.settings import ClassifierSettings, Settings

FAKE_UPSTREAM_PORT = 9100
PLATFORM_TENANT = "platform"  # the tenant platform administrators' keys belong to
ADMIN_KEY_FILE = "platform-admin.key"  # where `switchyard up` leaves its admin key
# In-flight requests' time to finish when the ingress is asked to stop.
INGRESS_GRACE_S = 10


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run Kafka, Redis, PostgreSQL and the gateway locally")
    up.add_argument("--data-dir", type=Path, default=Path(".stack"),
                    help="where the services keep their data and logs (wiped at start)")
    up.add_argument("--routers", type=int, default=1, help="router worker processes")
    up.add_argument("--fake-upstream-port", type=int, default=FAKE_UPSTREAM_PORT,
                    help="port of the fake upstream, started when "
                    "SWITCHYARD_FALLBACK_UPSTREAM_URL is unset")
    up.add_argument("--metrics-ports", choices=("default", "off"), default="default",
                    help="the workers' metrics and probe ports: the defaults (router 9101, "
                    "usage 9102, audit 9103, classifier 9104, more routers 9111, …), or none")
    sub.add_parser("ingress", help="run the HTTP ingress")
    sub.add_parser("classifier", help="run the classifier as its own stage (for routers "
                   "started with SWITCHYARD_ROUTER__CLASSIFY_INLINE=false)")
    classify = sub.add_parser("classify", help="label prompts with the prompt classifier, "
                              "or score it on a labelled JSON Lines file")
    classify.add_argument("prompt", nargs="*", help="prompt(s) to label ('-': read stdin)")
    classify.add_argument("--eval", type=Path, metavar="FILE.jsonl",
                          help="print accuracy, macro-F1 and per-label scores on a file of "
                          "objects with 'text' and 'label'")
    classify.add_argument("--model", type=Path, help="ONNX linear model file (default: the "
                          "configured SWITCHYARD_CLASSIFIER__MODEL_PATH)")
    classify.add_argument("--encoder", type=Path, help="ONNX encoder file asked when the "
                          "linear model is unsure (default: the configured "
                          "SWITCHYARD_CLASSIFIER__ENCODER_PATH)")
    classify.add_argument("--linear-only", action="store_true",
                          help="the linear model alone, without the encoder")
    classify.add_argument("--errors", type=int, default=0, metavar="N",
                          help="with --eval: also print N of the rows it got wrong (gold -> "
                          "predicted (confidence): text), drawn with --seed")
    classify.add_argument("--seed", type=int, default=0, help="the draw of --errors")
    sub.add_parser("router", help="run a router worker")
    sub.add_parser("usage", help="run the usage worker")
    audit = sub.add_parser("audit", help="the audit trail: its writer, and checking its chains")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("run", help="run the audit writer (audit.events into PostgreSQL)")
    verify = audit_sub.add_parser("verify", help="recompute the audit hash chains; exit 1 "
                                  "naming the first row that does not fit")
    verify.add_argument("--tenant", help="one tenant's chain (default: every tenant's, which "
                        "needs a database role that bypasses row-level security)")
    sub.add_parser("init", help="create the Kafka topics and apply the PostgreSQL migrations")
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("--tenant", required=True, help="tenant name (created if missing)")
    admin = sub.add_parser("admin", help="platform administrators (the admin API's keys)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    admin_create = admin_sub.add_parser(
        "create", help="create a platform_admin key (and its platform tenant if missing) and "
        "print it (shown only once)")
    admin_create.add_argument("--name", default=PLATFORM_TENANT,
                              help=f"the platform tenant's name (default: {PLATFORM_TENANT})")
    vault = sub.add_parser("vault", help="master keys of the tenants' provider key vault")
    vault_sub = vault.add_subparsers(dest="vault_command", required=True)
    vault_sub.add_parser("reencrypt", help="re-encrypt every stored provider key under the "
                         "active master key (SWITCHYARD_VAULT__ACTIVE_KEY_ID)")
    new_master = vault_sub.add_parser("new-master-key", help="print a fresh random master key "
                                      "in the SWITCHYARD_VAULT__MASTER_KEYS format")
    new_master.add_argument("--id", help="its id (default: the first free of k1, k2, …)")
    auth = sub.add_parser("auth", help="signing keys of session tokens")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True)
    new_signing = auth_sub.add_parser("new-signing-key", help="print a fresh random session "
                                      "signing key in the SWITCHYARD_AUTH__SIGNING_KEYS format")
    new_signing.add_argument("--id", help="its id (default: the first free of s1, s2, …)")
    sub.add_parser("fake-upstream", help="run the fake OpenAI-compatible upstream",
                   add_help=False)

    args, rest = parser.parse_known_args(argv)
    stop_with_launcher(os.environ)  # a gateway's child: not left running if its launcher dies
    if args.command == "fake-upstream":
        from compose.fake_upstream import main as fake_main

        fake_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    settings = Settings()
    if args.command == "up":
        _up(settings, args.data_dir, args.routers, args.fake_upstream_port,
            metrics_ports=args.metrics_ports == "default")
    elif args.command == "ingress":
        _ingress(settings)
    elif args.command == "classifier":
        from workers.classifier.main import main as classifier_main

        classifier_main()
    elif args.command == "classify":
        cfg = settings.classifier
        updates: dict[str, object] = {"model_path": args.model or cfg.model_path,
                                      "encoder_path": args.encoder or cfg.encoder_path}
        if args.linear_only:
            updates["encoder_path"] = None
        _classify(cfg.model_copy(update=updates), args.prompt, args.eval, args.errors,
                  args.seed)
    elif args.command == "router":
        from workers.router.main import main as router_main

        router_main()
    elif args.command == "usage":
        from workers.usage.main import main as usage_main

        usage_main()
    elif args.command == "audit":
        _audit(settings, args.audit_command, getattr(args, "tenant", None))
    elif args.command == "init":
        asyncio.run(_init(settings))
    elif args.command == "keys":
        key_id, api_key = asyncio.run(_create_key(settings, args.tenant))
        print(f"key id: {key_id}\napi key (shown once, store it now): {api_key}")
    elif args.command == "admin":
        tenant_id, key_id, api_key = asyncio.run(_create_admin(settings, args.name))
        print(f"platform tenant: {tenant_id} ({args.name})\nkey id: {key_id}\n"
              f"platform admin key (shown once, store it now): {api_key}")
    elif args.command == "vault":
        _vault(settings, args.vault_command, getattr(args, "id", None))
    elif args.command == "auth":
        _new_signing_key(settings, args.id)


def _classify(cfg: ClassifierSettings, prompts: list[str], eval_path: Path | None,
              errors: int, seed: int) -> None:
    from workers.classifier.cascade import CascadeClassifier
    from workers.classifier.evaluate import label_file

    if not prompts and eval_path is None:
        sys.exit("classify: give a prompt, '-' for stdin, or --eval FILE.jsonl")
    if errors and eval_path is None:
        sys.exit("classify: --errors needs --eval FILE.jsonl")
    classifier = CascadeClassifier.from_settings(cfg)
    if eval_path is not None:
        print(f"{classifier.version} on {eval_path}")
        labelled = label_file(classifier, eval_path)
        print(labelled.report().table())
        if errors > 0:
            print(f"\n{errors} of the rows it got wrong (seed {seed}):")
            print("\n".join(miss.line() for miss in labelled.misses(errors, seed)))
    texts = [sys.stdin.read() if p == "-" else p for p in prompts]
    for prediction in classifier.classify(texts):
        print(f"{prediction.label}\t{prediction.confidence:.4f}")


def _ingress(settings: Settings) -> None:
    import uvicorn

    from topics.logs import logging_config

    # Ours and uvicorn's loggers alike, as the workers' (workers/runtime.py); uvicorn applies
    # it in each of its worker processes (SWITCHYARD_INGRESS__WORKERS > 1) as well.
    options = dict(host=settings.ingress.host, port=settings.ingress.port, loop="uvloop",
                   http="httptools", log_level=settings.log_level.lower(), access_log=False,
                   timeout_graceful_shutdown=INGRESS_GRACE_S,
                   log_config=logging_config("ingress", settings.log_level, settings.log_format))
    if settings.ingress.workers > 1:  # uvicorn's own process manager, its own stop
        uvicorn.run("ingress.app:create_app", factory=True, workers=settings.ingress.workers,
                    **options)  # type: ignore[arg-type]
        return
    from ingress.server import BoundedServer

    config = uvicorn.Config("ingress.app:create_app", factory=True,
                            **options)  # type: ignore[arg-type]
    server = BoundedServer(config, close_timeout_s=settings.shutdown_close_timeout_s)
    server.run()
    if not server.started:
        sys.exit(3)  # what uvicorn.run exits with when the app does not start


async def _init(settings: Settings) -> None:
    from state.migrations import apply_migrations, ensure_app_login
    from topics.kafka import ensure_topics

    created = await ensure_topics(settings.kafka)
    print(f"topics created: {', '.join(created) or 'none (all exist)'}")
    applied = await apply_migrations(settings.postgres.owner_dsn)
    print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
    login = await ensure_app_login(settings.postgres.owner_dsn, settings.postgres.dsn)
    print(f"application role: {login}")


async def _create_key(settings: Settings, tenant: str) -> tuple[str, str]:
    import asyncpg

    from state.keys import create_key

    conn = await asyncpg.connect(settings.postgres.owner_dsn)
    try:
        return await create_key(conn, tenant)
    finally:
        await conn.close()


def _audit(settings: Settings, command: str, tenant: str | None) -> None:
    if command == "run":
        from workers.audit.main import main as audit_main

        audit_main()
        return
    from state.audit import ChainReport, chained_tenants, verify_chain

    async def verify() -> list[ChainReport]:
        import asyncpg

        # The owner: one tenant's chain reads under that tenant, the list of every chain in a
        # platform scope (row-level security binds the owner too).
        pool = await asyncpg.create_pool(settings.postgres.owner_dsn, min_size=1, max_size=2)
        try:
            tenants = [tenant] if tenant is not None else await chained_tenants(pool)
            return [await verify_chain(pool, t) for t in tenants]
        finally:
            await pool.close()

    try:
        reports = asyncio.run(verify())
    except PermissionError as exc:
        sys.exit(f"audit verify: {exc} (--tenant T)")
    broken = 0
    for report in reports:
        if report.ok:
            # The head hash, kept elsewhere, shows later whether the chain was rewritten.
            print(f"OK      tenant {report.tenant_id}: {report.rows} rows, head "
                  f"{report.head_hash or '(empty)'}")
        else:
            broken += 1
            print(f"BROKEN  tenant {report.tenant_id} at row {report.broken_seq}"
                  f"{f' (event {report.broken_event_id})' if report.broken_event_id else ''}: "
                  f"{report.problem}")
    if not reports:
        print("no audit chains")
    if broken:
        sys.exit(f"audit verify: {broken} of {len(reports)} chains broken")


async def _create_admin(settings: Settings, tenant_name: str) -> tuple[str, str, str]:
    """A new platform_admin key of the platform tenant: (tenant id, key id, key)."""
    import asyncpg

    from state.tenants import ensure_platform_admin

    # The owner: the platform tenant is no tenant's to create (row-level security).
    conn = await asyncpg.connect(settings.postgres.owner_dsn)
    try:
        tenant_id, key, api_key = await ensure_platform_admin(conn, tenant_name,
                                                              "platform admin")
        return tenant_id, key.key_id, api_key
    finally:
        await conn.close()


def _vault(settings: Settings, command: str, key_id: str | None) -> None:
    from state.vault import MasterKeys, reencrypt_all, rows_by_master_key, vault_not_configured
    from topics.errors import SwitchyardError

    if command == "new-master-key":
        spec = settings.vault.master_keys.get_secret_value()
        taken = {entry.partition(":")[0].strip() for entry in spec.split(",")}
        key_id = key_id or next(f"k{n}" for n in range(1, 10_000) if f"k{n}" not in taken)
        print(MasterKeys.generate(key_id))  # stdout carries the key alone, for scripts
        print(f"append it to SWITCHYARD_VAULT__MASTER_KEYS everywhere, then set "
              f"SWITCHYARD_VAULT__ACTIVE_KEY_ID={key_id} and run `switchyard vault reencrypt`",
              file=sys.stderr)
        return

    async def reencrypt() -> tuple[int, dict[str, int]]:
        import asyncpg

        keys = MasterKeys.from_settings(settings.vault)
        if keys is None:
            raise vault_not_configured()
        # Every tenant's rows: the owner role's work (state/tenancy.py platform_scope).
        pool = await asyncpg.create_pool(settings.postgres.owner_dsn, min_size=1, max_size=2)
        try:
            return await reencrypt_all(pool, keys), await rows_by_master_key(pool)
        finally:
            await pool.close()

    try:
        changed, by_key = asyncio.run(reencrypt())
    except SwitchyardError as exc:
        sys.exit(f"vault reencrypt: {exc.message}")
    active = settings.vault.active_key_id
    print(f"re-encrypted {changed} provider keys under master key {active!r}")
    old = {k: n for k, n in by_key.items() if k != active}
    print(f"still under other master keys: {old} (run again)" if old
          else "no stored key uses any other master key; those may be removed")


def _new_signing_key(settings: Settings, key_id: str | None) -> None:
    from topics.sessions import SigningKeys

    spec = settings.auth.signing_keys.get_secret_value()
    taken = {entry.partition(":")[0].strip() for entry in spec.split(",")}
    key_id = key_id or next(f"s{n}" for n in range(1, 1000) if f"s{n}" not in taken)
    print(SigningKeys.generate(key_id))  # stdout carries the key alone, for scripts
    print(f"append it to SWITCHYARD_AUTH__SIGNING_KEYS on every ingress, restart them, then set "
          f"SWITCHYARD_AUTH__ACTIVE_SIGNING_KEY={key_id} (docs/tenancy.md, key rotation)",
          file=sys.stderr)


def _dev_signing_key(settings: Settings) -> Settings:
    """Settings with a session signing key: the configured one, else one generated for this
    run (tokens then end with the stack, which wipes its data at start anyway)."""
    if settings.auth.signing_keys.get_secret_value().strip():
        return settings
    from pydantic import SecretStr

    from topics.sessions import SigningKeys

    print("session signing key: generated for this run (set SWITCHYARD_AUTH__SIGNING_KEYS "
          "to keep sessions across restarts)")
    return settings.model_copy(update={"auth": settings.auth.model_copy(update={
        "signing_keys": SecretStr(SigningKeys.generate("dev")), "active_signing_key": "dev"})})


async def _seed_dev_key(settings: Settings) -> tuple[str, bool]:
    """The dev tenant's key: SWITCHYARD_DEV_API_KEY if set, else a new one."""
    import asyncpg

    from state.keys import new_api_key, seed_key

    conn = await asyncpg.connect(settings.postgres.owner_dsn)
    try:
        api_key = settings.dev_api_key or new_api_key()
        await seed_key(conn, "dev", api_key)
        return api_key, settings.dev_api_key is None
    finally:
        await conn.close()


def _up(settings: Settings, data_dir: Path, routers: int,
        fake_upstream_port: int = FAKE_UPSTREAM_PORT, *, metrics_ports: bool = True) -> None:
    from compose.gateway import Gateway, GaveUp, RestartPolicy, default_metrics_ports
    from compose.stack import LocalStack
    from topics.catalog import load_catalog

    catalog = load_catalog(settings.catalog_path)
    configured = [p.api_key_env for p in catalog.providers.values()
                  if os.environ.get(p.api_key_env)]
    fake_port = None
    if settings.fallback_upstream_url is None:
        fake_port = fake_upstream_port
        settings = settings.model_copy(
            update={"fallback_upstream_url": f"http://127.0.0.1:{fake_port}/v1"})
    print(f"providers with keys: {', '.join(configured) or 'none'}; models without a key go to "
          f"{settings.fallback_upstream_url}" + (" (fake upstream)" if fake_port else ""))

    settings = _dev_signing_key(settings)
    if "SWITCHYARD_LOG_FORMAT" not in os.environ:
        # Read in a terminal: text lines, unless JSON is asked for.
        settings = settings.model_copy(update={"log_format": "text"})

    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    restart_policy = RestartPolicy()
    gave_up = ""
    stopping = threading.Event()
    running: list[Gateway] = []

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set() and running:
            print(f"second {signal.Signals(signum).name}: killing the gateway's processes",
                  file=sys.stderr, flush=True)
            running[0].kill_all()
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def log(message: str) -> None:
        print(message, flush=True)

    with LocalStack(settings, data_dir / "services", log=log) as _stack:
        api_key, generated = asyncio.run(_seed_dev_key(settings))
        # The admin API's key: in a file of the data directory (owner-only), not on screen.
        admin_key_file = data_dir / ADMIN_KEY_FILE
        _, _, admin_key = asyncio.run(_create_admin(settings, PLATFORM_TENANT))
        admin_key_file.touch(mode=0o600)
        admin_key_file.write_text(admin_key + "\n")
        with Gateway(settings, data_dir / "logs", routers=routers,
                     fake_upstream_port=fake_port, log=log,
                     metrics_ports=default_metrics_ports(routers) if metrics_ports
                     else None) as gateway:
            running.append(gateway)
            metrics = "".join(f"\n    {name}: {url}"
                              for name, url in gateway.metrics_urls.items())
            print(f"\nSwitchyard is up at {gateway.url}"
                  f"\n  dev API key{' (generated)' if generated else ''}: {api_key}"
                  f"\n  try: curl {gateway.url}/v1/chat/completions -H 'Authorization: Bearer "
                  f"{api_key}' -H 'Content-Type: application/json' -d '{{\"model\": "
                  f"\"gpt-4o-mini\", \"messages\": [{{\"role\": \"user\", \"content\": "
                  f"\"hello\"}}]}}'"
                  f"\n  platform admin key (the admin API, docs/tenancy.md): in "
                  f"{admin_key_file}\n  metrics (and /healthz, /readyz beside them):"
                  f"{metrics}\n  Ctrl-C stops everything (twice: at once); a process "
                  f"that exits on its own is restarted.", flush=True)
            # A process that dies is restarted (compose/gateway.py RestartPolicy); one that
            # keeps dying stops everything.
            try:
                gateway.supervise(stopping, restart_policy)
            except GaveUp as exc:
                gave_up = str(exc)
                print(f"stopping: {gave_up}", file=sys.stderr, flush=True)
            print("stopping…", flush=True)
    if gave_up:
        sys.exit(f"switchyard up stopped: {gave_up}")


if __name__ == "__main__":
    main()
