"""Issue 15 item 6: certificate renewal has limits. A device whose clock runs weeks ahead renews
once, not in a loop (its agent judges a certificate's age from the certificate's own start and
a monotonic clock); a device that floods up/cert with requests gets pki.renewal_limit
certificates and counted, audited refusals. Real hub, real Mosquitto, a real agent under
libfaketime.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from edgefleet.wire.protocol import (
    CERT,
    CertIssued,
    CertRefused,
    CertRequest,
    down_filter,
    pack,
    unpack_cert_reply,
    up_topic,
)
from tests.integration.test_check import libfaketime, needs_libfaketime
from tests.integration.test_renewal import IN_USE, hub_events, hub_rows
from tests.integration.test_store_forward_faults import agent_argv
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, run_cli
from tests.unit.test_unit_renewal import csr_for

pytestmark = pytest.mark.integration

AHEAD = "+70d"  # 90-day certificates (the default): every new one looks two thirds old to this clock
FIRST_RENEWAL = 60.0  # start, key made in a helper process, request, switch; on a loaded machine
WATCH = 10.0  # the old agent asked ~10 times a second here; this proves it stopped at one
FLOOD = 300  # requests, each for a new key, as fast as the connection takes them
REPLIES = 60.0  # every request answered, on a loaded 2-core machine


def in_band_certificates(hub_dir: HubDir, device: str) -> int:
    rows = hub_rows(hub_dir, "SELECT COUNT(*) FROM certificates WHERE device = ? AND key_id IS NOT NULL", (device,))
    return int(str(rows[0][0]))


@needs_libfaketime
async def test_an_agent_whose_clock_runs_70_days_ahead_renews_once(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-ahead")
    env = {"LD_PRELOAD": str(libfaketime()), "FAKETIME": AHEAD, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
           "FAKETIME_NO_CACHE": "1", "TZ": "UTC"}
    agent = await Proc("dev-ahead", agent_argv(bundles / "dev-ahead"), env=env).start()
    try:
        await agent.wait_for(IN_USE, timeout=FIRST_RENEWAL)
        mark = agent.mark()
        await agent.wait_for(r"the system clock runs ahead of the hub's")
        await asyncio.sleep(WATCH)  # proving a negative: time for many more requests, if the agent made them
        assert not [line for line in agent.lines[mark:] if "certificate request sent" in line]
    finally:
        await agent.stop()
    issued = in_band_certificates(hub_dir, "dev-ahead")
    print(f"certificates issued in band to a device 70 days ahead: {issued}")
    assert issued == 1
    # The operator hears of it: the agent's audit of the skew reaches the hub's events.
    deadline = time.monotonic() + FIRST_RENEWAL
    while True:
        code, out, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--device", "dev-ahead",
                                       "--kind", "cert_clock_skew", "--json")
        assert code == 0, err
        if out.strip() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    skew = [json.loads(line) for line in out.splitlines()]
    assert skew, "no cert_clock_skew event at the hub"
    assert skew[0]["body"]["clock_minus_start_s"] > 69 * 86400
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    assert [d["device"] for d in json.loads(out)["clock_skew"]] == ["dev-ahead"]
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert "devices whose clock disagrees with their certificate (set it: NTP): 1" in out


async def test_a_device_flooding_certificate_requests_gets_the_limit_and_is_reported(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-flood", "dev-calm")
    session = await connect(device_identity(bundles / "dev-flood"), hub_dir.port, "dev-flood")
    try:
        await session.subscribe([(down_filter("dev-flood"), 1)])
        requests = [pack(CertRequest(csr=csr_for("dev-flood")[0])) for _ in range(FLOOD)]
        started = time.monotonic()
        for payload in requests:
            await session.publish(up_topic("dev-flood", CERT), payload, qos=1)
        print(f"{FLOOD} certificate requests sent in {time.monotonic() - started:.2f} s")
        replies = []
        async with asyncio.timeout(REPLIES):
            while len(replies) < FLOOD:
                message = await session.next_message()
                if message.topic.endswith("/" + CERT):
                    replies.append(unpack_cert_reply(message.payload))
    finally:
        await session.close()
    issued = [r for r in replies if isinstance(r, CertIssued)]
    refused = [r for r in replies if isinstance(r, CertRefused)]
    print(f"{len(issued)} issued, {len(refused)} refused")
    assert len(issued) == 3  # pki.renewal_limit's default
    assert len(refused) == FLOOD - 3
    assert {r.reason for r in refused} == {"rate_limited"}
    assert in_band_certificates(hub_dir, "dev-flood") == 3
    assert len(hub_events(hub_dir, "cert_refused")) == 1  # audited once, not 297 rows
    await hub.wait_for(r"certificate request from dev-flood refused \(rate_limited\)")
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    refusals = json.loads(out)["renewal_refused"]
    assert [(r["device"], r["reason"]) for r in refusals] == [("dev-flood", "rate_limited")]
    # Another device is not held back by the flooder.
    calm = await connect(device_identity(bundles / "dev-calm"), hub_dir.port, "dev-calm")
    try:
        await calm.subscribe([(down_filter("dev-calm"), 1)])
        async with asyncio.timeout(REPLIES):
            await calm.publish(up_topic("dev-calm", CERT), pack(CertRequest(csr=csr_for("dev-calm")[0])), qos=1)
            assert isinstance(unpack_cert_reply((await calm.next_message()).payload), CertIssued)
    finally:
        await calm.close()
