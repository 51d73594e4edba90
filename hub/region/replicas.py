"""What a hub replica needs before it connects: a name hub.toml lists, its own certificate, and a
broker ACL that admits it (docs/scaling.md)."""

from __future__ import annotations

import logging

from cryptography import x509

from edgefleet.runtime.files import write_atomic
from hub.broker import acl_rules, reload_broker
from hub.config import HubConfig, HubPaths
from hub.db.store import HubStore
from hub.errors import UsageError
from hub.pki.authority import Authority, cert_pem, common_name, key_pem, renewal_due_in, utcnow

log = logging.getLogger("hub.replicas")


async def prepare_replica(paths: HubPaths, config: HubConfig, replica: str) -> None:
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
    key, cert = ca.issue_client(identity, pki.server_cert_lifetime)
    assert key is not None  # a new key was made
    write_atomic(paths.replica_key(replica), key_pem(key), 0o600)
    write_atomic(paths.replica_cert(replica), cert_pem(cert), 0o644)
    store = await HubStore.open(paths.db)
    try:
        await store.record_certificate(cert.serial_number, identity, "hub", cert.not_valid_after_utc)
    finally:
        await store.close()
    log.info("issued %s for the hub replica %s (valid until %s)", paths.replica_cert(replica), identity,
             cert.not_valid_after_utc.date())


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
