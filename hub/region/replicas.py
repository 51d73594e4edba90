"""What a hub replica needs before it connects: a name hub.toml lists, its own certificate, and a
broker ACL that admits it (docs/scaling.md). `create_replica_folder` puts all of it in a folder for
another machine, when the hub's state is in PostgreSQL."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import msgspec
from cryptography import x509

from edgefleet.runtime.files import write_atomic
from hub.broker import acl_rules, reload_broker
from hub.config import HubConfig, HubPaths, config_mode, render_hub_toml
from hub.db.engines import open_store
from hub.errors import UsageError
from hub.ingest.subscriptions import share_group
from hub.pki.authority import Authority, cert_pem, common_name, key_pem, renewal_due_in, utcnow

log = logging.getLogger("hub.replicas")


async def prepare_replica(paths: HubPaths, config: HubConfig, replica: str) -> None:
    if config.hub.replica:  # a folder of its own (create_replica_folder): everything is there already
        if not (paths.replica_cert(replica).is_file() and paths.replica_key(replica).is_file()):
            raise UsageError(f"{paths.pki} lacks the certificate of the replica {replica!r}: make the folder again "
                             f"with edge-hub replica create on the primary")
        return
    if replica not in config.hub.replicas:
        listed = ", ".join(config.hub.replicas) or "none"
        raise UsageError(f"{paths.config} does not list the replica {replica!r} (its [hub] replicas: {listed}): "
                         f"add it there, then start the replica")
    await _ensure_certificate(paths, config, replica)
    _ensure_admitted(paths, config)


async def _ensure_certificate(paths: HubPaths, config: HubConfig, replica: str) -> None:
    """The replica's certificate, issued anew at its start unless it has one that the leader's
    upkeep (hub.pki.renewal) would not renew yet: the same lifetime and the same rule."""
    identity, pki = config.replica_identity(replica), config.pki
    ca = Authority.load(paths.ca_key, paths.ca_cert)
    try:
        cert = x509.load_pem_x509_certificate(paths.replica_cert(replica).read_bytes())
        current = (common_name(cert) == identity and cert.issuer == ca.cert.subject
                   and renewal_due_in(cert.not_valid_after_utc, pki.server_cert_lifetime,
                                      pki.server_cert_renew_fraction, utcnow()) > 0
                   and paths.replica_key(replica).is_file())
    except (OSError, ValueError):
        current = False
    if current:
        return
    cert = await _issue(ca, config, replica, paths, paths)
    log.info("issued %s for the hub replica %s (valid until %s)", paths.replica_cert(replica), identity,
             cert.not_valid_after_utc.date())


async def _issue(ca: Authority, config: HubConfig, replica: str, into: HubPaths, hub: HubPaths) -> x509.Certificate:
    """A new key and certificate for the replica, written into `into` and recorded in `hub`'s database."""
    key, cert = ca.issue_client(config.replica_identity(replica), config.pki.server_cert_lifetime)
    assert key is not None  # a new key was made
    write_atomic(into.replica_key(replica), key_pem(key), 0o600)
    write_atomic(into.replica_cert(replica), cert_pem(cert), 0o644)
    store = await open_store(config.database.url, hub.db)
    try:
        await store.record_certificate(cert.serial_number, config.replica_identity(replica), "hub",
                                       cert.not_valid_after_utc)
    finally:
        await store.close()
    return cert


def _ensure_admitted(paths: HubPaths, config: HubConfig) -> None:
    """Write the ACL again if it predates a replica hub.toml now lists, and have the broker re-read it."""
    wanted = acl_rules(config.hub_identities)
    try:
        if paths.acl.read_text() == wanted:
            return
    except OSError:
        pass
    write_atomic(paths.acl, wanted.encode(), 0o644)
    if reload_broker(paths, config):
        log.info("the broker's ACL now admits %s", ", ".join(config.hub_identities))
    else:
        log.warning("wrote %s for %s, but no broker was reloaded: start the primary hub, or make the "
                    "broker re-read its ACL", paths.acl, ", ".join(config.hub_identities))


# What a replica's folder copies from the primary's directory: what it checks peers with (the CA's
# certificate), signs policies with when it leads, names the shared subscription with, and the CRL as
# of now (kept current by the primary, which holds the CA key).
_COPIED: Final = ("ca_cert", "policy_key", "policy_pub", "share_group", "crl")


async def create_replica_folder(paths: HubPaths, config: HubConfig, name: str, out: Path) -> Path:
    """A self-contained folder from which `edge-hub run --dir OUT` runs replica `name` on another
    machine: its own certificate, the database URL, the broker's address; never the CA key."""
    if not config.database.url:
        raise UsageError(f"{paths.config} keeps the hub's state in hub.db, which only this machine can share: "
                         "replicas on other machines need [database] url (edge-hub init --database)")
    if config.hub.replica:
        raise UsageError(f"{paths.root} is the folder of replica {config.hub.replica!r}: run replica create in "
                         "the primary's directory, which holds the CA key")
    if name not in config.hub.replicas:
        raise UsageError(f"{paths.config} does not list the replica {name!r} in [hub] replicas: add it there "
                         "(the broker's ACL admits only the hub processes listed), then run this again")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty: give a new folder")
    share_group(paths)  # made now if no hub process ran yet
    _ensure_admitted(paths, config)
    there = HubPaths(out.resolve())
    there.root.mkdir(mode=0o711, parents=True, exist_ok=True)
    there.pki.mkdir(mode=0o711, exist_ok=True)
    for attribute in _COPIED:
        source, target = getattr(paths, attribute), getattr(there, attribute)
        write_atomic(target, source.read_bytes(), source.stat().st_mode & 0o777)
    identity = config.replica_identity(name)
    cert = await _issue(Authority.load(paths.ca_key, paths.ca_cert), config, name, there, paths)
    # Its broker is the primary's (or the region's external one): never one of its own.
    folder = msgspec.structs.replace(config, broker=msgspec.structs.replace(config.broker, mode="external"),
                                     hub=msgspec.structs.replace(config.hub, replica=name),
                                     metrics=msgspec.structs.replace(config.metrics, port=0))
    write_atomic(there.config, render_hub_toml(folder).encode(), config_mode(folder))
    log.info("made %s for the hub replica %s (its certificate valid until %s)", there.root, identity,
             cert.not_valid_after_utc.date())
    return there.root
