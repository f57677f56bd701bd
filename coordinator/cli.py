"""`privdistill-coordinator` command line: provision, sites, renew-cert, serve, shards (student commands plug in)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from coordinator import student_cli
from privdistill import cli_base


def _with_config(p: argparse.ArgumentParser) -> None:
    cli_base.add_config(p, option=True, help="DIR/coordinator/coordinator.yaml")


def build_parser() -> argparse.ArgumentParser:
    p, sub = cli_base.root_parser("privdistill-coordinator",
                                  "Receive signed shards from sites over HTTPS; train the student.")

    pr = cli_base.command(sub, "provision", _provision,
                          "make the CA, the coordinator's TLS cert/config and site identities")
    pr.add_argument("--sites", required=True, help="comma-separated site names, e.g. hospital-a,hospital-b")
    pr.add_argument("--out", type=Path, required=True, help="new (or empty) directory to write into")
    pr.add_argument("--host", default="127.0.0.1", help="name/IP sites use to reach the coordinator")
    pr.add_argument("--port", type=int, default=8443)
    pr.add_argument("--days", type=int, default=397, help="certificate validity")

    st_sub = cli_base.subcommands(cli_base.command(sub, "sites", None, "the allow-list of site public keys"),
                                  "sites_command")
    add = cli_base.command(st_sub, "add", _sites_add, "register a site's public key (base64 from its site.pub)")
    add.add_argument("name")
    add.add_argument("pubkey")
    _with_config(add)
    ls = cli_base.command(st_sub, "list", _sites_list, "registered sites")
    cli_base.add_json(ls)
    _with_config(ls)
    rv = cli_base.command(st_sub, "revoke", _sites_revoke, "refuse every further request signed by this site")
    rv.add_argument("name")
    _with_config(rv)
    ro = cli_base.command(st_sub, "rotate", _sites_rotate, "new key pair and kit for a site; the old key is refused "
                          "from now on, the site's shards and history stay under its name")
    ro.add_argument("name")
    _with_config(ro)
    ro.add_argument("--out", type=Path, required=True, help="new (or empty) directory for the site's new kit")
    ro.add_argument("--host", help="coordinator host name for the kit (default: from the server certificate)")
    ro.add_argument("--port", type=int, help="coordinator port for the kit (default: listen.port)")

    rc = cli_base.command(sub, "renew-cert", _renew_cert, "re-issue the coordinator's TLS certificate from the kit's CA")
    rc.add_argument("--kit", type=Path, required=True, help="the provisioning folder (holds ca/ca.key)")
    rc.add_argument("--host", help="host name for the certificate (default: the current certificate's)")
    rc.add_argument("--days", type=int, help="validity (default: 397, at most until the CA expires)")

    sv = cli_base.command(sub, "serve", _serve, "run the HTTPS upload service")
    _with_config(sv)
    sv.add_argument("--port", type=int, default=None, help="override listen.port")
    sv.add_argument("--host", default=None, help="override listen.host")
    sv.add_argument("--workers", type=int, default=None, help="override listen.workers (server processes)")

    sh_sub = cli_base.subcommands(cli_base.command(sub, "shards", None, "accepted shards"), "shards_command")
    sl = cli_base.command(sh_sub, "list", _shards_list, "accepted shards that training uses (--all: with excluded, "
                          "quarantined and removed ones)")
    cli_base.add_json(sl)
    sl.add_argument("--all", action="store_true", help="every accepted shard, with its status")
    _with_config(sl)
    for name, what in (("quarantine", "hold a shard back from training (its files stay; `shards include` undoes it)"),
                       ("remove", "delete a shard's files and keep it out of training for good"),
                       ("include", "let a quarantined shard, or one excluded by `sites revoke`, into training again")):
        sp = cli_base.command(sh_sub, name, _shard_status, what)
        sp.add_argument("shard", nargs="?", help="tar sha256 (or its first 8+ hex digits) or shard id")
        if name == "include":
            sp.add_argument("--site", help="instead of one shard: every excluded or quarantined shard of this site")
        sp.add_argument("--reason", required=name != "include", default=None,
                        help="why (recorded in the ledger and the audit log)")
        _with_config(sp)

    fd = cli_base.command(sub, "federate", _federate, "federated mode: train the student with Flower FedAvg across "
                          "the sites (each trains only on its own approved shard)")
    _with_config(fd)
    fd.add_argument("--training", type=Path, required=True, help="training config (with a federated: section)")
    fd.add_argument("--out", type=Path, required=True, help="new (or empty) directory for model/ and federated.json")
    fd.add_argument("--superlink", help="target a running SuperLink HOST:PORT instead of starting one")
    fd.add_argument("--port", type=int, default=9092, help="port of the SuperLink this command starts")
    fd.add_argument("--timeout", type=float, default=3600, help="seconds before the run is stopped")

    student_cli.add_commands(sub)
    return p


def _ledger(config_path: Path, *, read_only: bool = False) -> Any:
    """The ledger of the coordinator config's state_dir; ``read_only``: never create it (ConfigError if absent)."""
    from coordinator.config import load_coordinator_config
    from coordinator.ledger import Ledger

    cfg = load_coordinator_config(config_path)
    return Ledger(cfg.ledger_path, read_only=read_only)


def _audit_log(ledger: Any) -> Any:
    from coordinator.audit_log import AuditLog

    return AuditLog(ledger.state_dir)


def _provision(args: argparse.Namespace) -> int:
    from coordinator.provision import provision

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    done = provision(args.out, sites, host=args.host, port=args.port, days=args.days)
    print(f"provisioned {len(sites)} site(s) in {done.root}")
    print(f"  coordinator: privdistill-coordinator serve --config {done.config}")
    for site, d in done.site_dirs.items():
        print(f"  site {site}: copy {d}/ to that site (contains its private key)")
    return 0


def _sites_add(args: argparse.Namespace) -> int:
    ledger = _ledger(args.config)
    row = ledger.add_site(args.name, args.pubkey)
    _audit_log(ledger).event("site_added", site=row.name)
    print(f"site {row.name} registered")
    return 0


def _sites_rotate(args: argparse.Namespace) -> int:
    from coordinator.provision import rotate_site

    ledger = _ledger(args.config)
    done = rotate_site(args.config, args.name, args.out, host=args.host, port=args.port)
    print(f"site {done.site}: new key (old key sha256 {done.old_key_sha256[:16]}... refused from now on)"
          f"{'; it was revoked and is active again' if done.was_revoked else ''}")
    held = [s for s in ledger.all_shards() if s.site == done.site and s.status == "excluded"]
    if held:
        print(f"  {len(held)} shard(s) of {done.site} stay excluded from training since the revocation: "
              f"`shards include --site {done.site}` after checking them")
    print(f"  hand {done.kit}/ to the site (it holds the new private keys), then delete your copy")
    if done.node_pub is None:
        print(f"  federated mode: copy {done.kit}/flower-node.pub to the coordinator's flower-nodes/"
              f"{done.site}.pub (its folder was not writable here)")
    return 0


def _sites_revoke(args: argparse.Namespace) -> int:
    ledger = _ledger(args.config)
    row, excluded, closed = ledger.revoke_site(args.name)
    _audit_log(ledger).event("site_revoked", site=row.name, shards_excluded=excluded, uploads_closed=closed)
    print(f"site {row.name} revoked at {row.revoked_at}; {excluded} shard(s) excluded from training (`shards "
          f"include --site {row.name}` to let them in again), {closed} open upload(s) closed")
    return 0


def _sites_list(args: argparse.Namespace) -> int:
    rows = _ledger(args.config, read_only=True).sites()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    for r in rows:
        print(f"{r.name:<24} {'revoked' if r.revoked else 'active':<8} added {r.added_at}  "
              f"last seen {r.last_seen_at or 'never'}")
    return 0


def _renew_cert(args: argparse.Namespace) -> int:
    from coordinator.provision import renew_server_cert

    pem = renew_server_cert(args.kit, host=args.host, days=args.days)
    print(f"renewed {pem} (and server.key beside it); restart the coordinator (and SuperLink) to use it")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from coordinator.config import load_coordinator_config
    from coordinator.serve import serve

    return serve(load_coordinator_config(args.config), host=args.host, port=args.port, workers=args.workers)


def _federate(args: argparse.Namespace) -> int:
    from coordinator.federate import federate

    def ready(address: str) -> None:
        print(f"SuperLink ready at {address} (TLS, SuperNode authentication on); sites may now run "
              "`privdistill-site join SITE_CONFIG --workdir WORKDIR`", flush=True)

    res = federate(args.config, args.training, args.out, superlink=args.superlink, port=args.port,
                   timeout=args.timeout, on_ready=ready)
    print(f"federated student: {args.out / 'model'}; {res['rounds_completed']} round(s) with sites "
          f"{', '.join(res['participating_sites'])}; {len(res['refusals'])} refusal(s); see "
          f"{args.out / 'federated.json'}")
    return 0


def _shards_list(args: argparse.Namespace) -> int:
    ledger = _ledger(args.config, read_only=True)
    rows = ledger.all_shards() if args.all else ledger.accepted_shards()
    if args.json:
        print(json.dumps([{**r.__dict__, "dir": str(r.dir)} for r in rows], indent=2))
        return 0
    for r in rows:
        print(f"{r.tar_sha256[:16]}  {r.site:<16} {r.shard_id:<24} {r.sample_count:>7} samples  "
              f"{r.accepted_at}" + (f"  {r.status} ({r.status_reason})" if args.all else ""))
    return 0


def _shard_status(args: argparse.Namespace) -> int:
    """`shards quarantine | remove | include`: one ledger status change (and audit record) per shard."""
    import shutil

    from privdistill.errors import ConfigError

    ledger = _ledger(args.config)
    if getattr(args, "site", None):
        if args.shard:
            raise ConfigError(["give a shard or --site, not both"])
        targets = [s for s in ledger.all_shards() if s.site == args.site and s.status in ("excluded", "quarantined")]
    elif args.shard:
        targets = ledger.find_shards(args.shard)
        if len(targets) != 1:
            raise ConfigError([f"{args.shard!r} matches {len(targets)} shards; give more of its sha256 (see "
                               "`shards list --all`)"])
    else:
        raise ConfigError(["name a shard (its sha256 prefix or shard id)" +
                           (" or --site NAME" if args.shards_command == "include" else "")])
    status = {"quarantine": "quarantined", "remove": "removed", "include": "active"}[args.shards_command]
    audit = _audit_log(ledger)
    for shard in targets:
        done = ledger.set_shard_status(shard.tar_sha256, status, args.reason)
        if status == "removed":
            shutil.rmtree(done.dir, ignore_errors=True)
        audit.event(f"shard_{'included' if status == 'active' else status}", site=done.site,
                    shard_sha256=done.tar_sha256, reason=args.reason, shard_id=done.shard_id, previous=shard.status)
        print(f"shard {done.tar_sha256[:16]} ({done.site}/{done.shard_id}): {shard.status} -> {done.status}")
    if not targets:
        print(f"site {args.site}: no excluded or quarantined shard")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_base.main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
