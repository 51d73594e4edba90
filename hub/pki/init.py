"""`edge-hub init`: a new hub directory with its PKI, broker files and hub.toml."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgefleet.errors import ConfigError
from edgefleet.runtime.files import write_atomic
from edgefleet.runtime.settings import to_struct
from edgefleet.wire.protocol import ProtocolError, validate_name
from hub.broker import port_holder, port_taken, write_broker_files
from hub.config import HubConfig, HubPaths, config_mode, render_hub_toml
from hub.db.engines import open_store
from hub.db.interface import is_postgres_url
from hub.errors import UsageError
from hub.ingest.subscriptions import share_group
from hub.pki.authority import Authority, cert_pem, key_pem

log = logging.getLogger("hub.setup")


async def init_hub(directory: Path, region: str, *, port: int, host: str, bind: str, force: bool,
                   database: str = "") -> HubPaths:
    try:
        validate_name(region, "region")
    except ProtocolError as exc:
        raise UsageError(exc.detail) from None
    # Built through validation (msgspec checks bounds on conversion, not on construction),
    # before anything on disk is touched.
    try:
        config = to_struct({"region": region, "broker": {"host": host, "port": port, "bind": bind},
                            "database": {"url": database}}, HubConfig, "edge-hub init")
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    paths = HubPaths(directory.resolve())
    if database:
        if not is_postgres_url(database):
            raise UsageError(f"--database {database.split('://', 1)[0]}://...: give a postgresql://USER@HOST:PORT/DB "
                             "URL, or leave it out to keep the hub's state in hub.db")
        # Reached, and its schema made or migrated, before anything on disk is touched.
        await (await open_store(database, paths.db)).close()
    if paths.config.exists():
        if not force:
            raise UsageError(
                f"{directory} already holds a hub (hub.toml exists). Pass --force to replace it: "
                "its CA, keys and database are moved aside and every certificate it issued stops working"
            )
        _move_aside(paths)
    paths.root.mkdir(mode=0o711, parents=True, exist_ok=True)
    paths.pki.mkdir(mode=0o711, exist_ok=True)
    paths.broker.mkdir(mode=0o711, exist_ok=True)

    ca = Authority.create(region)
    write_atomic(paths.ca_key, key_pem(ca.key), 0o600)
    write_atomic(paths.ca_cert, cert_pem(ca.cert), 0o644)

    policy_key = Ed25519PrivateKey.generate()
    write_atomic(paths.policy_key, key_pem(policy_key), 0o600)
    write_atomic(paths.policy_pub, policy_key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), 0o644)

    server_key, server_cert = ca.issue_server([host, "127.0.0.1", "::1", "localhost"], config.pki.server_cert_lifetime)
    write_atomic(paths.server_key, key_pem(server_key), 0o600)
    write_atomic(paths.server_cert, cert_pem(server_cert), 0o644)

    # renewed by hub/pki/renewal.py
    hub_key, hub_cert = ca.issue_client(config.identity, config.pki.server_cert_lifetime)
    assert hub_key is not None
    write_atomic(paths.hub_key, key_pem(hub_key), 0o600)
    write_atomic(paths.hub_cert, cert_pem(hub_cert), 0o644)

    crl = ca.issue_crl([], config.pki.crl_lifetime)
    write_atomic(paths.crl, crl.public_bytes(Encoding.PEM), 0o644)

    store = await open_store(config.database.url, paths.db)
    try:
        await store.record_certificate(hub_cert.serial_number, config.identity, "hub", hub_cert.not_valid_after_utc)
        await store.record_certificate(server_cert.serial_number, host, "server", server_cert.not_valid_after_utc)
    finally:
        await store.close()
    write_atomic(paths.config, render_hub_toml(config).encode(), config_mode(config))
    write_broker_files(paths, config)
    share_group(paths)
    if port_taken(bind, port):
        log.warning("port %d on %s is already used by %s: `edge-hub run` cannot start the broker there until "
                    "it is free; stop that, or change broker.port in %s before you provision devices", port, bind,
                    port_holder(port), paths.config)
    return paths


def _move_aside(paths: HubPaths) -> None:
    """--force never deletes a hub: its files go to DIR/replaced-<time>/."""
    aside = Path(tempfile.mkdtemp(prefix=f"replaced-{time.strftime('%Y%m%dT%H%M%S')}-", dir=paths.root))
    for item in (paths.config, paths.db, paths.pki, paths.broker, paths.run,
                 paths.db.with_name("hub.db-wal"), paths.db.with_name("hub.db-shm")):
        if item.exists():
            item.rename(aside / item.name)
