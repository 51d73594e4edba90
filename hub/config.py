"""The hub's directory layout and hub.toml, validated once at load."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from edgefleet.errors import ConfigError
from edgefleet.runtime.settings import read_toml, to_struct, toml_value
from edgefleet.wire.protocol import ProtocolError, hub_identity, validate_name
from hub.db.interface import is_postgres_url, redact
from hub.errors import NotInitialised, UsageError

DEFAULT_PORT: Final = 8883
# The shortest lifetime hub.toml may give a certificate or the CRL: a renewal (a key, a request,
# a reconnect) must fit comfortably in the last third of it. Only tests and drills go this low.
MIN_LIFETIME_S: Final = 10.0
DAY_S: Final = 86400.0


class BrokerConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # "managed": edge-hub run starts and supervises Mosquitto with the files in DIR/broker.
    # "external": an operator-run broker; edge-hub only connects to it.
    mode: Literal["managed", "external"] = "managed"
    host: str = "127.0.0.1"  # the name devices and the hub dial; it is in the server cert
    port: Annotated[int, Meta(ge=1, le=65535)] = DEFAULT_PORT
    bind: str = "127.0.0.1"  # managed: the listener address ("0.0.0.0" for every interface)
    # managed, when started as root: the account Mosquitto drops to ("" = "mosquitto").
    user: str = ""
    executable: str = "mosquitto"
    # Off by default: the agent's outbox and end-to-end acks are the durable queue, not
    # the broker (whose persistence is a periodic snapshot).
    persistence: bool = False
    # external: command that makes the broker reload its CRL (e.g. systemctl reload mosquitto)
    reload_command: list[str] = []


class PkiConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Lifetimes in days; fractions of a day are allowed (tests and drills), down to MIN_LIFETIME_S."""

    device_cert_days: Annotated[float, Meta(gt=0, le=3650)] = 90  # agents renew in band two thirds in
    # The broker's server certificate and the hub's own client certificate, renewed by the hub
    # once less than server_cert_renew_fraction of that is left.
    server_cert_days: Annotated[float, Meta(gt=0, le=3650)] = 397
    server_cert_renew_fraction: Annotated[float, Meta(gt=0, lt=1)] = 1 / 3
    crl_days: Annotated[float, Meta(gt=0, le=365)] = 30
    # Re-issue the CRL once less than this fraction of its life remains: an expired CRL
    # makes Mosquitto refuse every client, so never cut it close.
    crl_renew_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.5
    # In-band certificates one device may get within a window of renewal_window_days (at most
    # half a device certificate's life): a healthy device renews once per two thirds of a life,
    # plus a retry or two after a refused switch; more is a clock gone wrong or a device misused.
    renewal_limit: Annotated[int, Meta(ge=1, le=1000)] = 3
    renewal_window_days: Annotated[float, Meta(gt=0, le=365)] = 1

    @property
    def renewal_window(self) -> dt.timedelta:
        return min(dt.timedelta(days=self.renewal_window_days), self.device_cert_lifetime / 2)

    def __post_init__(self) -> None:
        for name, days in (("device_cert_days", self.device_cert_days), ("server_cert_days", self.server_cert_days),
                           ("crl_days", self.crl_days)):
            if days * DAY_S < MIN_LIFETIME_S:
                raise ValueError(f"{name} = {days:g} is {days * DAY_S:.3g} s: give at least {MIN_LIFETIME_S:g} s "
                                 f"({MIN_LIFETIME_S / DAY_S:.6f} days)")

    @property
    def device_cert_lifetime(self) -> dt.timedelta:
        return dt.timedelta(days=self.device_cert_days)

    @property
    def server_cert_lifetime(self) -> dt.timedelta:
        return dt.timedelta(days=self.server_cert_days)

    @property
    def crl_lifetime(self) -> dt.timedelta:
        return dt.timedelta(days=self.crl_days)


class HubConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keepalive: Annotated[int, Meta(ge=2, le=3600)] = 30
    # Names of extra hub processes that share this hub's database and broker (`edge-hub run
    # --replica NAME`); each connects as hub.REGION.NAME and the ACL admits each (docs/scaling.md).
    replicas: tuple[str, ...] = ()
    # Set in a folder made by `edge-hub replica create`: this directory runs that replica, on a machine
    # of its own (its state in [database] url, its broker elsewhere; docs/scaling.md).
    replica: str = ""
    # A device is shown offline when its presence says so (Last Will, 1.5 x its keepalive).


Percent = Annotated[float, Meta(ge=0, le=100)]


class RolloutConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Policy rollouts: waves after the canary, and the health gates watched while a wave bakes."""

    bake_s: Annotated[float, Meta(ge=0, le=7 * 86400)] = 600.0  # per wave, unless push --bake says otherwise
    # Cumulative percentages of the targeted devices after the canary; 100 always comes last.
    waves: tuple[Annotated[float, Meta(gt=0, le=100)], ...] = (25.0, 50.0)
    # A gate breaches when the figure, over the devices the rollout has reached, is ABOVE it.
    max_apply_failure_pct: Percent = 0.0  # devices that refused the new version
    max_action_failure_pct: Percent = 20.0  # failed actions among actions taken under it
    min_actions: Annotated[int, Meta(ge=1)] = 3  # actions needed before the failure rate counts
    max_offline_pct: Percent = 20.0  # devices online when reached, offline since
    # ... for at least this long: a hub restart restarts its managed broker, and every device
    # is offline for a moment; that is not the policy's doing.
    offline_grace_s: Annotated[float, Meta(ge=0, le=86400)] = 60.0
    max_escalations: Annotated[int, Meta(ge=0)] = 0  # rules suspended and escalated under it
    # A device online but off its intended version this long is "drifted" and sent it again.
    drift_grace_s: Annotated[float, Meta(gt=0, le=86400)] = 120.0


class MetricsConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Prometheus text exposition of the hub's state (hub/metrics.py); port 0 turns it off."""

    listen: str = "127.0.0.1"  # "0.0.0.0" to let a Prometheus elsewhere scrape it
    port: Annotated[int, Meta(ge=0, le=65535)] = 9464


Days = Annotated[float, Meta(gt=0, le=36500)]


class RetentionConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How long readings and events are kept, in days by their own timestamps; unset keeps them
    forever. Fractions of a day are allowed (drills and tests)."""

    telemetry_days: Days | None = None
    events_days: Days | None = None

    @property
    def telemetry_s(self) -> float | None:
        return None if self.telemetry_days is None else self.telemetry_days * DAY_S

    @property
    def events_s(self) -> float | None:
        return None if self.events_days is None else self.events_days * DAY_S


class EnrollConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Zero-touch enrollment over HTTPS (hub/pki/enroll_server.py, docs/enrollment.md); port 0 turns it off."""

    port: Annotated[int, Meta(ge=0, le=65535)] = 0
    bind: str = ""  # "" = broker.bind: devices reach both on the same address
    # Token buckets (requests per second, and the burst a bucket holds): over all credentials,
    # and per credential, so one leaked credential cannot take the whole budget.
    rate: Annotated[float, Meta(gt=0, le=10_000)] = 200.0
    burst: Annotated[int, Meta(ge=1, le=100_000)] = 400
    credential_rate: Annotated[float, Meta(gt=0, le=10_000)] = 100.0
    credential_burst: Annotated[int, Meta(ge=1, le=100_000)] = 200
    max_pending: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000  # requests held for approval, per credential
    retry_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0  # what a held device is told: ask again after this


class DatabaseConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the hub's state lives: "" for hub.db in the hub directory (SQLite), or a PostgreSQL URL
    (postgresql://USER[:PASSWORD]@HOST:PORT/DB) that hub processes on several machines share."""

    url: str = ""


class HubConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    region: str
    database: DatabaseConf = DatabaseConf()
    broker: BrokerConf = BrokerConf()
    pki: PkiConf = PkiConf()
    hub: HubConf = HubConf()
    rollout: RolloutConf = RolloutConf()
    metrics: MetricsConf = MetricsConf()
    retention: RetentionConf = RetentionConf()
    enroll: EnrollConf = EnrollConf()

    @property
    def identity(self) -> str:
        """The region's hub: the primary's certificate CN, and the name the hub's own events go under."""
        return hub_identity(self.region)

    def replica_identity(self, replica: str | None) -> str:
        """The certificate CN (and so MQTT client id) of one hub process; None is the primary."""
        return self.identity if replica is None else f"{self.identity}.{replica}"

    @property
    def hub_identities(self) -> list[str]:
        """Every identity the broker's ACL lets read and write all topics."""
        return [self.identity, *(self.replica_identity(r) for r in self.hub.replicas)]


@dataclass(frozen=True)
class HubPaths:
    """Where everything of one hub lives, under its directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "hub.toml"

    @property
    def db(self) -> Path:
        return self.root / "hub.db"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def hub_cert(self) -> Path:
        return self.pki / "hub.crt"

    @property
    def hub_key(self) -> Path:
        return self.pki / "hub.key"

    def replica_cert(self, replica: str) -> Path:
        return self.pki / f"hub-{replica}.crt"

    def replica_key(self, replica: str) -> Path:
        return self.pki / f"hub-{replica}.key"

    @property
    def share_group(self) -> Path:
        """The secret name of the hub processes' shared subscription group (hub/ingest/subscriptions.py)."""
        return self.pki / "share-group"

    @property
    def policy_key(self) -> Path:
        return self.pki / "policy.key"

    @property
    def policy_pub(self) -> Path:
        return self.pki / "policy.pub"

    @property
    def crl(self) -> Path:
        return self.pki / "crl.pem"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def server_cert(self) -> Path:
        return self.broker / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.broker / "server.key"

    @property
    def broker_conf(self) -> Path:
        return self.broker / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.broker / "acl"

    @property
    def broker_data(self) -> Path:
        return self.broker / "data"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def broker_pid(self) -> Path:
        return self.run / "mosquitto.pid"


def load_hub(directory: Path) -> tuple[HubPaths, HubConfig]:
    paths = HubPaths(directory.resolve())
    if not paths.config.is_file():
        raise NotInitialised(str(directory))
    try:
        config = to_struct(read_toml(paths.config), HubConfig, str(paths.config))
        validate_name(config.region, "region")
        for replica in (*config.hub.replicas, *([config.hub.replica] if config.hub.replica else [])):
            validate_name(replica, "replica")
        if len(set(config.hub.replicas)) != len(config.hub.replicas):
            raise UsageError(f"{paths.config}: [hub] replicas names a replica twice")
        if config.database.url and not is_postgres_url(config.database.url):
            raise UsageError(f"{paths.config}: [database] url must be empty (hub.db here) or a postgresql://"
                             f"USER@HOST:PORT/DB URL, not {config.database.url.split('://', 1)[0]!r}: correct it")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except ProtocolError as exc:
        raise UsageError(f"{paths.config}: {exc.detail}") from None
    return paths, config


def config_mode(config: HubConfig) -> int:
    """hub.toml's file mode: private when its database URL carries a password (better kept in ~/.pgpass)."""
    return 0o600 if redact(config.database.url) != config.database.url else 0o644


def render_hub_toml(config: HubConfig) -> str:
    b, p, r = config.broker, config.pki, config.rollout
    return f"""\
# edgefleet hub configuration, written by `edge-hub init`. Paths are fixed by the layout of
# this directory (pki/, broker/, hub.db); see docs/operations.md.
region = {toml_value(config.region)}

[database]   # "" keeps the hub's state in hub.db here; postgresql://USER@HOST:PORT/DB shares it (docs/scaling.md)
url = {toml_value(config.database.url)}

[broker]
mode = {toml_value(b.mode)}          # "managed": edge-hub run supervises Mosquitto; "external"
host = {toml_value(b.host)}    # the name devices dial; it is in the broker's certificate
port = {b.port}
bind = {toml_value(b.bind)}    # managed listener address; "0.0.0.0" for every interface
user = {toml_value(b.user)}              # account Mosquitto drops to when started as root ("" = mosquitto)
executable = {toml_value(b.executable)}
persistence = {toml_value(b.persistence)}     # the agents' outboxes are the durable queue, not the broker
reload_command = {toml_value(b.reload_command)}    # external broker: how to make it re-read the CRL

[pki]   # lifetimes in days; fractions of a day only for tests and drills (at least {MIN_LIFETIME_S:g} s)
device_cert_days = {p.device_cert_days:g}         # devices renew in band two thirds into it
server_cert_days = {p.server_cert_days:g}        # the broker's certificate and the hub's own
server_cert_renew_fraction = {p.server_cert_renew_fraction:g}   # ... re-issued once less than this share is left
crl_days = {p.crl_days:g}
crl_renew_fraction = {p.crl_renew_fraction:g}      # re-issued once less than this share is left

[hub]
keepalive = {config.hub.keepalive}
replicas = {toml_value(list(config.hub.replicas))}        # extra hub processes on this database (docs/scaling.md)
replica = {toml_value(config.hub.replica)}              # set by `edge-hub replica create`: the replica this folder runs

[rollout]   # edge-hub policy push: waves, and the health gates that roll a policy back
bake_s = {r.bake_s:g}              # seconds each wave bakes before the next (push --bake overrides)
waves = {toml_value([float(w) for w in r.waves])}     # % of targeted devices after the canary; 100 % comes last
max_apply_failure_pct = {r.max_apply_failure_pct:g}   # roll back when more reached devices refuse it
max_action_failure_pct = {r.max_action_failure_pct:g}  # ... when more of its actions fail
min_actions = {r.min_actions}           # (once at least this many actions were taken)
max_offline_pct = {r.max_offline_pct:g}       # ... when more reached devices go offline
offline_grace_s = {r.offline_grace_s:g}       # (and stay offline at least this long)
max_escalations = {r.max_escalations}       # ... when more rules escalate under it
drift_grace_s = {r.drift_grace_s:g}      # off the intended version this long while online: drifted

[enroll]   # zero-touch enrollment over HTTPS (docs/enrollment.md)
port = {config.enroll.port}               # 0: off; e.g. 8884 to let image folders (edge-hub enroll create) enroll

[metrics]   # Prometheus text exposition at http://LISTEN:PORT/metrics (docs/operations.md)
listen = {toml_value(config.metrics.listen)}
port = {config.metrics.port}              # 0 turns it off

[retention]   # days readings and events are kept, by their timestamps; unset keeps them forever
{_days_line("telemetry_days", config.retention.telemetry_days, 90)}
{_days_line("events_days", config.retention.events_days, 365)}
"""


def _days_line(key: str, days: float | None, example: int) -> str:
    return f"# {key} = {example}" if days is None else f"{key} = {days:g}"
