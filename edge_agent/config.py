"""The agent's configuration (agent.toml plus `--set` overrides), validated once at load."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from edgefleet.errors import ConfigError
from edgefleet.mqtt.session import TlsIdentity
from edgefleet.policy.check import check_policy
from edgefleet.policy.document import Policy, PolicyError
from edgefleet.policy.profiles import (
    PROFILE_DIRS,
    PROFILE_KEYS,
    GpioOutputSpec,
    Profile,
    load_profile,
    split_sensors,
    with_field_actuators,
    with_field_sensors,
    with_local_writes,
)
from edgefleet.runtime.settings import apply_override, read_toml, split_overrides, to_struct
from edgefleet.wire.protocol import MAX_BATCH_RECORDS, ProtocolError, validate_name

DEFAULT_CONFIG: Final = Path("/etc/edge-agent/agent.toml")


class BrokerConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] = 8883
    keepalive: Annotated[int, Meta(ge=2, le=3600)] = 30
    connect_timeout: Annotated[float, Meta(gt=0, le=120)] = 10.0


class TlsConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ca: str = "ca.crt"
    cert: str = "device.crt"
    key: str = "device.key"


class StateConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dir: str = "state"
    # this board's identity for clone detection; "" reads it from the hardware (edge_agent.buffer.machine)
    machine: str = ""


class OutboxConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # "full": a commit survives power loss; "normal": only a crash of the agent (fewer fsyncs).
    synchronous: Literal["full", "normal"] = "full"
    # Overrides the profile's budgets.disk_mb when set (MB).
    quota_mb: Annotated[float, Meta(gt=0)] | None = None
    # Disk held back beside the outbox and given up when the disk fills (MB; 0: none), so that
    # the agent can make room and go on; see docs/store-and-forward.md.
    ballast_mb: Annotated[float, Meta(ge=0, le=1024)] = 4.0


class UplinkConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch_max: Annotated[int, Meta(ge=1, le=MAX_BATCH_RECORDS)] = 5000
    window: Annotated[int, Meta(ge=1, le=256)] = 8
    ack_timeout: Annotated[float, Meta(gt=0, le=3600)] = 15.0
    status_interval: Annotated[float, Meta(gt=0, le=3600)] = 10.0


class MetricsConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Prometheus text exposition of this agent (edge_agent/metrics.py): loopback only, off by default."""

    listen: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 0


class EnrollConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """First-boot enrollment of an image folder (edge_agent/identity/enroll.py, docs/enrollment.md)."""

    url: str  # https://HUB:PORT/enroll, written by `edge-hub enroll create`
    token: str = "enroll.token"  # noqa: S105  # the file holding the bootstrap credential, relative to this file
    # Where the device id comes from when agent.toml sets none ("file": device_id_file, relative to this file).
    device_id_source: Literal["machine-id", "serial", "hostname", "file"] = "machine-id"
    device_id_file: str = ""
    device_id_prefix: str = ""  # put before the id read, e.g. "pi-"


class FieldActuatorConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """This device's additions to its profile's actuator allowlists (for its own field devices)."""

    # <sensor>.<point> of Modbus coils and holding registers that rules may write (modbus_write).
    modbus: list[str] = []
    # Topics of this device's local broker that rules may publish to (mqtt_publish).
    mqtt_topics: list[str] = []
    # GPIO lines that rules may drive (gpio_set, gpio_pulse).
    gpio_outputs: list[GpioOutputSpec] = []


class AgentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    profile: str
    broker: BrokerConf
    device_id: str = ""  # required unless [enroll] gives a source
    enroll: EnrollConf | None = None
    region: str = ""
    tags: dict[str, str] = {}
    tls: TlsConf = TlsConf()
    state: StateConf = StateConf()
    outbox: OutboxConf = OutboxConf()
    uplink: UplinkConf = UplinkConf()
    metrics: MetricsConf = MetricsConf()
    actuators: FieldActuatorConf = FieldActuatorConf()
    # A local policy file (rules), relative to this file: in force until the hub's first
    # signed policy arrives, and again if the hub withdraws its policies.
    policy: str | None = None
    # The hub's policy-signing public key (Ed25519, PEM); without it every signed policy is refused.
    policy_key: str = "policy.pub"
    # A folder of firmware profiles (relative to this file) searched before /etc/edge-agent/profiles
    # and the built-in ones.
    profiles_dir: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"


CONFIG_KEYS: Final = frozenset(AgentConfig.__struct_fields__)


@dataclass(frozen=True)
class AgentSettings:
    """Everything a run needs: the config, its profile, and absolute paths."""

    path: Path
    config: AgentConfig
    profile: Profile

    @property
    def base(self) -> Path:
        return self.path.parent

    def resolve(self, value: str) -> Path:
        """Paths in agent.toml are relative to its folder, so a bundle can be moved whole."""
        candidate = Path(value)
        return candidate if candidate.is_absolute() else (self.base / candidate)

    @property
    def tls(self) -> TlsIdentity:
        t = self.config.tls
        return TlsIdentity(self.resolve(t.ca), self.resolve(t.cert), self.resolve(t.key))

    @property
    def enroll_token(self) -> Path | None:
        e = self.config.enroll
        return None if e is None else self.resolve(e.token)

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.config.state.dir)

    def load_policy(self) -> Policy | None:
        """The local policy, validated against this profile's metrics and actuators."""
        if self.config.policy is None:
            return None
        path = self.resolve(self.config.policy)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the policy: {exc.strerror}", str(path)) from None
        try:
            return check_policy(text, self.profile)
        except PolicyError as exc:
            raise ConfigError(str(exc), str(path)) from None

    @property
    def policy_key(self) -> Path:
        return self.resolve(self.config.policy_key)

    @property
    def quota_bytes(self) -> int:
        mb = self.config.outbox.quota_mb or self.profile.budgets.disk_mb
        return int(mb * 1_000_000)


def _enrolling_device_id(config: AgentConfig, path: Path) -> str:
    """The id an image folder's device takes from its [enroll] source; ConfigError without one."""
    e = config.enroll
    if e is None:
        raise ConfigError("the device id is missing: set device_id, or enroll from an image folder ([enroll], "
                          "edge-hub enroll create)", str(path))
    if not e.url.startswith("https://"):
        raise ConfigError(f"enroll.url = {e.url!r} is not an https:// URL: the credential is never sent in clear",
                          str(path))
    from edge_agent.identity.enroll import read_device_id

    file = (path.resolve().parent / e.device_id_file) if e.device_id_file else None
    try:
        return read_device_id(e.device_id_source, file, e.device_id_prefix)
    except ConfigError as exc:
        raise ConfigError(str(exc), str(path)) from None


def load_settings(path: Path, overrides: Iterable[str] = ()) -> AgentSettings:
    raw = read_toml(path)
    routed = split_overrides(overrides, {"config": set(CONFIG_KEYS), "profile": set(PROFILE_KEYS)})
    for parts, value in routed["config"]:
        apply_override(raw, parts, value)
    # agent.toml's [[sensors]] are this device's field sensors, added to its profile's.
    field = split_sensors(raw, str(path), field_only=True)
    raw.pop("sensors", None)
    config = to_struct(raw, AgentConfig, str(path))
    if not config.device_id:
        config = msgspec.structs.replace(config, device_id=_enrolling_device_id(config, path))
    try:
        validate_name(config.device_id)
        if config.region:
            validate_name(config.region, "region")
    except ProtocolError as exc:
        raise ConfigError(exc.detail, str(path)) from None
    if config.metrics.port:
        from edgefleet.runtime.exposition import loopback

        loopback(config.metrics.listen)  # a device's metrics never leave it
    search: tuple[Path, ...] = PROFILE_DIRS
    if config.profiles_dir is not None:
        search = (path.resolve().parent / config.profiles_dir, *PROFILE_DIRS)  # an absolute one stays as it is
    profile = with_field_sensors(load_profile(config.profile, routed["profile"], search), field, str(path))
    profile = with_field_actuators(profile, config.actuators.modbus, str(path))
    profile = with_local_writes(profile, config.actuators.mqtt_topics, config.actuators.gpio_outputs, str(path))
    return AgentSettings(path=path.resolve(), config=config, profile=profile)
