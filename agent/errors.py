"""The exception tree of ev-edge-agent.

Every error the agent raises on purpose is one of these. Foreign exceptions (cbor2, nacl,
sqlite3, paho, pymodbus, python-can, web3 ...) are translated at the boundary with
``raise OurError(...) from exc`` so callers catch only what is drawn here::

    EdgeAgentError
    +-- ConfigError                 bad config file / value (names file, key, expected, found)
    +-- ProtocolError               a protocol rule broken
    |   +-- LocalProtocolError      we asked for something the protocol forbids
    |   |                           (e.g. sending PAY before FUNDED, clearing DTCs when disabled)
    |   +-- RemoteProtocolError     the peer / the input broke it (hostile bytes land here)
    |       +-- DecodeError         bytes that do not decode
    |       |   +-- MalformedCBOR           not well-formed CBOR, truncated, trailing bytes
    |       |   +-- NonDeterministicCBOR    well-formed but not RFC 8949 s4.2 deterministic
    |       |   +-- DuplicateMapKey         a CBOR map repeats a key
    |       |   +-- OversizeInput           longer / deeper / bigger than we accept
    |       +-- MalformedEnvelope   decodes, but is not our COSE_Sign1 / payload schema
    |           +-- WrongTag        not tag 18 (COSE_Sign1)
    |           +-- WrongAlgorithm  protected header alg is not EdDSA (-8)
    +-- SignatureError              a signature does not check
    |   +-- BadSignature            the bytes were changed, or signed by another key
    |   +-- UnknownKey              kid not in the registry / key store
    |   +-- RevokedKey              kid is in the registry's revoked list
    |   +-- RegistryRefusal         the fleet registry refuses a change (revoked signer,
    |                               unknown kid, a second device with one id, ...)
    +-- KeyStoreError               key files: missing, unreadable, wrong size
    |   +-- InsecureKeyFile         a secret key file readable by group/others
    +-- AdapterError                a data source (OBD, ELM327, DBC, Modbus ...)
    |   +-- AdapterUnavailable      port/bus/host absent, optional dependency missing
    |   +-- AdapterIOError          read/write failed, CRC error, exception response
    |   +-- AdapterTimeout          no answer in time (silent ECU, meter off the line)
    +-- StateDirError               the state directory is missing, a file, read-only
    |   +-- StateDirLocked          another agent (pid N) holds the state directory's lock
    +-- SpoolError                  the durable store (disk full, corrupt database)
    +-- UplinkError                 MQTT connection / authorisation failures
    +-- ChannelError                payment channel rule broken (reason code, nonce)
    +-- SettlementError             contract / JSON-RPC node failures

Each error carries a short machine-readable ``reason`` (a kebab-case code used by counters
and logs) and structured fields. Messages never contain secret key material.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class Prose(str):
    """A ``found`` value that is already words (``nothing (the key is required)``), shown
    as it is rather than quoted like a value from the file."""


def show_value(value: object) -> str:
    """A config value in the file's own words (TOML), never a Python repr: strings in
    double quotes, ``true``/``false``, arrays as ``[1, 2]``; ``None`` is "nothing"."""
    if isinstance(value, Prose):
        return str(value)
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 80 else value[:77] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        items = ", ".join(show_value(item) for item in value[:8])
        return f"[{items}{', ...' if len(value) > 8 else ''}]"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__


class ConfigError(EdgeAgentError):
    """A config file or value is wrong. Example: ``batch.max_readings = -1``.

    The message names the file, the key, what was expected and what was found.
    """

    reason = "config"

    def __init__(
        self,
        message: str | None = None,
        *,
        file: str | None = None,
        key: str | None = None,
        expected: str | None = None,
        found: object = None,
    ) -> None:
        self.file, self.key, self.expected, self.found = file, key, expected, found
        if message is None:
            where = f"{file}: " if file else ""
            what = f"{key}: " if key else ""
            message = f"{where}{what}expected {expected}, found {show_value(found)}"
        super().__init__(message)


class ProtocolError(EdgeAgentError):
    reason = "protocol"


class LocalProtocolError(ProtocolError):
    """We tried something the protocol forbids. Example: service 04 with clearing disabled."""

    reason = "local-protocol"


class RemoteProtocolError(ProtocolError):
    """The peer or the input broke the protocol. Example: a garbage ELM327 line."""

    reason = "remote-protocol"


class DecodeError(RemoteProtocolError):
    """Bytes that do not decode. ``offset`` is where decoding stopped, when known."""

    reason = "decode"

    def __init__(self, message: str, *, offset: int | None = None, reason: str | None = None):
        super().__init__(message, reason=reason)
        self.offset = offset


class MalformedCBOR(DecodeError):
    """Not well-formed CBOR: truncated, reserved additional info, trailing bytes."""

    reason = "malformed-cbor"


class NonDeterministicCBOR(DecodeError):
    """Well-formed CBOR that is not deterministic (RFC 8949 s4.2.1): a long head for a small
    number, an indefinite length, an unsorted map, a float that fits a shorter one."""

    reason = "non-deterministic-cbor"


class DuplicateMapKey(DecodeError):
    """A CBOR map repeats a key (RFC 8949 s5.6: such a map is invalid)."""

    reason = "duplicate-map-key"


class OversizeInput(DecodeError):
    """Input larger, deeper or longer than the configured limit."""

    reason = "oversize"


class MalformedEnvelope(RemoteProtocolError):
    """Decodes as CBOR, but is not our envelope (missing field, wrong type)."""

    reason = "malformed-envelope"


class WrongTag(MalformedEnvelope):
    """The outer CBOR tag is not 18 (COSE_Sign1, RFC 9052 s4.2)."""

    reason = "wrong-tag"


class WrongAlgorithm(MalformedEnvelope):
    """The protected header's alg is not EdDSA (-8)."""

    reason = "wrong-alg"


class SignatureError(EdgeAgentError):
    reason = "signature"

    def __init__(self, message: str, *, kid: bytes | None = None, reason: str | None = None):
        super().__init__(message, reason=reason)
        self.kid = kid


class BadSignature(SignatureError):
    """The signature does not match the bytes: edited, or signed by another key."""

    reason = "bad-signature"


class UnknownKey(SignatureError):
    """The key id is not known to the verifier's registry or key store."""

    reason = "unknown-key"


class RevokedKey(SignatureError):
    """The key id is listed as revoked in the fleet registry."""

    reason = "revoked-key"


class RegistryRefusal(SignatureError):
    """The fleet registry refuses a change, with the reason in ``reason``: a rotation signed
    by a revoked key (``revoked-signer``), re-adding a revoked key (``revoked-key``),
    revoking a key id it does not hold (``unknown-kid``), a provisioning record for a device
    id that already has keys (``device-exists``; ``registry add --replace`` for a legitimate
    re-provisioning), a second rotation from one key (``already-rotated``)."""

    reason = "registry-refusal"


class KeyStoreError(EdgeAgentError):
    """A key file is missing, unreadable or the wrong size. Example: ``keys show`` before
    ``keys init``."""

    reason = "keystore"


class InsecureKeyFile(KeyStoreError):
    """A secret key file that group or others can read. Fix: ``chmod 600 FILE``."""

    reason = "insecure-key-file"


class AdapterError(EdgeAgentError):
    """A data source failed. ``source`` is the adapter instance id from config."""

    reason = "adapter"

    def __init__(self, message: str, *, source: str | None = None, reason: str | None = None):
        super().__init__(message, reason=reason)
        self.source = source


class AdapterUnavailable(AdapterError):
    """Port, bus or host absent; or the optional dependency is not installed."""

    reason = "unavailable"


class AdapterIOError(AdapterError):
    """A read or write failed: CRC error, exception response, ISO-TP error."""

    reason = "io"


class AdapterTimeout(AdapterError):
    """No answer in time: silent ECU, ignition off, meter off the line."""

    reason = "timeout"


class StateDirError(EdgeAgentError):
    """The state directory cannot be used: missing and not creatable, a file, on a read-only
    file system, owned by another user. The message names the directory and the fix."""

    reason = "state-dir"


class StateDirLocked(StateDirError):
    """Another process holds the state directory (agent/statedir.py). Example: a technician
    runs ``edge-agent run`` by hand while the service is up. ``pid`` names the holder."""

    reason = "state-dir-locked"

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class SpoolError(EdgeAgentError):
    """The durable store failed: disk full, corrupt database."""

    reason = "spool"


class UplinkError(EdgeAgentError):
    """MQTT failed: broker unreachable, TLS handshake, not authorised."""

    reason = "uplink"


class ChannelError(EdgeAgentError):
    """A payment-channel rule was broken. ``nonce`` is the state nonce concerned, if any."""

    reason = "channel"

    def __init__(self, message: str, *, reason: str | None = None, nonce: int | None = None):
        super().__init__(message, reason=reason)
        self.nonce = nonce


class SettlementError(EdgeAgentError):
    """The contract or the JSON-RPC node failed: node down, transaction reverted."""

    reason = "settlement"
