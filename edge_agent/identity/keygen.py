"""A private key made on the device and its certificate request, in a short-lived process.

`cryptography` would cost the daemon 8-15 MB of RSS for good (docs/performance.md P3) for a
few milliseconds of work every couple of months. So the daemon runs
`python -m edge_agent.identity.keygen --key PATH --cn DEVICE` (`make_request`) and reads the result
from its stdout; only that process ever imports `cryptography`.

The key is written to PATH (mode 0600, atomically) before the request is made, and a key
already there is used again: a renewal interrupted by a crash asks for the same key, and
the hub answers a repeated request with the certificate it issued for it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from edgefleet.errors import KeyGenerationFailed

if TYPE_CHECKING:
    pass

# A Raspberry Pi Zero takes seconds to start Python and load `cryptography`; the work itself
# (one P-256 key, one signature) takes milliseconds.
KEYGEN_TIMEOUT: Final = 120.0
MAX_STDERR: Final = 500  # characters of the helper's error output repeated in our log


class KeyRequest(msgspec.Struct, frozen=True):
    csr: str  # PEM, CN = the device id
    key_id: str  # envelope.key_id of the public key's DER SubjectPublicKeyInfo, as the hub computes it
    reused: bool  # the key was already there (an earlier renewal was interrupted)


async def make_request(key: Path, cn: str) -> KeyRequest:
    """Run the helper process; raise KeyGenerationFailed with its reason."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent.identity.keygen", "--key", str(key), "--cn", cn,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(KEYGEN_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        await _stop(proc)
        raise KeyGenerationFailed(f"the key helper did not finish within {KEYGEN_TIMEOUT:.0f} s") from None
    except BaseException:  # our own cancellation (the agent stops): never leave the helper behind
        await _stop(proc)
        raise
    if proc.returncode != 0:
        reason = err.decode(errors="replace").strip().splitlines()
        raise KeyGenerationFailed(f"the key helper failed (exit {proc.returncode}): "
                                  f"{reason[-1][:MAX_STDERR] if reason else 'no reason given'}")
    try:
        return msgspec.json.decode(out, type=KeyRequest)
    except msgspec.DecodeError as exc:
        raise KeyGenerationFailed(f"the key helper's answer is unreadable: {exc}") from None


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def request_for(key: Path, cn: str) -> KeyRequest:
    """Make (or reuse) the key at `key` and a request for `cn`: the helper process's work."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from edgefleet.runtime.files import write_atomic
    from edgefleet.wire.keys import public_key_id

    reused = key.exists()
    if reused:
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key} does not hold an ECDSA key")
        private = loaded
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        write_atomic(key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), 0o600)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(private, hashes.SHA256()))
    return KeyRequest(csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
                      key_id=public_key_id(private.public_key()), reused=reused)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.identity.keygen",
                                     description="Make (or reuse) a P-256 key at --key and print a certificate "
                                                 "request for --cn, as JSON {csr, key_id, reused}.")
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--cn", required=True)
    args = parser.parse_args(argv)
    try:
        result = request_for(args.key, args.cn)
    except (OSError, ValueError) as exc:
        print(f"edge_agent.identity.keygen: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(msgspec.json.encode(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
