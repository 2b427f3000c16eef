"""Verifier of envelope streams: signatures, seq continuity, hash links, declared drops.

Feed envelopes one at a time (:meth:`Verifier.add`: a capture file, MQTT messages) and ask
for a :class:`VerifyReport` at any point. Per device it reports

- ``duplicates``: byte-identical envelopes seen again (QoS 1 redelivery, or a replay); they
  are removed and carry no new data, so they are reported but do not fail the stream;
- ``reorders``: an envelope that arrived after one with a higher seq;
- ``gaps``: seqs missing between the lowest and highest seen and not covered by a signed
  drop declaration (a capture may start mid-stream: the first seq seen is not a gap);
- ``broken_links``: ``prev`` not equal to the hash of the envelope before it (an edit, an
  insertion, a fork); ``seq_reused``: two different envelopes with one seq;
- ``device_mismatch``: an envelope whose device id is not the device its key belongs to;
- ``meter_signed_ok`` / ``meter_signed_bad``: ``Meter.OCMF`` readings (records an
  Eichrecht meter signed itself) checked against the ``Meter.PublicKey`` that meter
  reported in the stream (agent.ocmf); a record that does not verify fails the stream;
- ``missing_tail``: the device's own signed chain head (retained status, last will, or a
  head in the capture) names a seq above the last one seen: the end of the stream was cut
  off ("device says seq 4949, last seen 4944"); ``head_mismatch``: a head whose hash is not
  the hash of the envelope seen at its seq (a fork);
- and, not per device, ``failures`` by the specific reason code of the error
  (``bad-signature``, ``unknown-key``, ``revoked-key``, ``wrong-alg``, ``duplicate-map-key``,
  ``wrong-tag``, ``unprotected-header``, ``malformed-cbor`` ...: agent.errors).

Everything but duplicates fails the stream (``report.ok`` is False, exit status 1), and so
does a verification that checked no envelope at all: "every envelope verifies" about an
empty capture (a wrong file, a wrong topic) would be a false assurance.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from agent import dcbor
from agent.envelope import (
    COSE_SIGN1_TAG,
    GENESIS,
    KIND_DROP,
    ChainHead,
    OpenedEnvelope,
    is_head,
    open_envelope,
    open_head,
)
from agent.errors import (
    DecodeError,
    EdgeAgentError,
    RemoteProtocolError,
    SignatureError,
)
from agent.fleet_keys import FleetRegistry
from agent.ocmf import MeterSignedTally

# Start of every envelope on the wire: tag 18 (0xd2), array of 4 (0x84). Used to resync a
# capture after a damaged item.
ENVELOPE_MAGIC = bytes([0xC0 | COSE_SIGN1_TAG, 0x84])


@dataclass
class DeviceReport:
    device: str
    envelopes: int = 0
    readings: int = 0
    events: int = 0
    duplicates: int = 0
    reorders: int = 0
    gaps: int = 0
    gap_ranges: list[tuple[int, int]] = field(default_factory=list)
    broken_links: int = 0
    seq_reused: int = 0
    device_mismatch: int = 0
    dropped_declared: int = 0
    meter_signed_ok: int = 0
    meter_signed_bad: int = 0
    meter_signed_no_key: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_seq: int | None = None  # the highest seq the device's own signed head names
    missing_tail: int = 0
    head_mismatch: int = 0

    @property
    def ok(self) -> bool:
        return not (self.reorders or self.gaps or self.broken_links or self.seq_reused
                    or self.device_mismatch or self.meter_signed_bad or self.missing_tail
                    or self.head_mismatch)


@dataclass
class VerifyReport:
    devices: dict[str, DeviceReport]
    failures: Counter[str]
    failure_examples: list[str]

    @property
    def ok(self) -> bool:
        return self.envelopes > 0 and not sum(self.failures.values()) \
            and all(d.ok for d in self.devices.values())

    @property
    def envelopes(self) -> int:
        return sum(d.envelopes for d in self.devices.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "devices": {name: {k: v for k, v in vars(d).items() if k != "device"}
                        for name, d in self.devices.items()},
            # zero envelopes checked is a failure of its own, with its own code
            "failures": dict(self.failures) if self.envelopes else
            {**self.failures, "no-envelopes": 1},
            "envelopes": self.envelopes,
        }

    def format(self) -> str:
        lines = []
        for name, d in sorted(self.devices.items()):
            status = "OK" if d.ok else "FAIL"
            span = f"seq {d.first_seq}..{d.last_seq}" if d.first_seq is not None else "no seq"
            lines.append(f"{status} {name}: {d.envelopes} envelopes ({span}), {d.readings} "
                         f"readings, {d.events} events")
            for label, value in (("gaps (missing envelopes)", d.gaps),
                                 ("broken hash links", d.broken_links),
                                 ("seq reused by different envelopes", d.seq_reused),
                                 ("reordered", d.reorders),
                                 ("device id not matching its key", d.device_mismatch),
                                 ("chain heads not matching the envelope at their seq",
                                  d.head_mismatch),
                                 ("duplicates removed (QoS 1 redelivery or replay)", d.duplicates),
                                 ("dropped unsent, declared by a signed drop", d.dropped_declared),
                                 ("meter-signed OCMF records that verify", d.meter_signed_ok),
                                 ("meter-signed OCMF records that FAIL", d.meter_signed_bad),
                                 ("OCMF records without the meter's key in the stream",
                                  d.meter_signed_no_key)):
                if value:
                    lines.append(f"    {label}: {value}")
            if d.missing_tail:
                lines.append(f"    missing tail: device says seq {d.head_seq}, last seen "
                             f"{d.last_seq if d.last_seq is not None else 'none'} "
                             f"({d.missing_tail} envelope(s) never arrived)")
            if d.gap_ranges:
                shown = ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in d.gap_ranges[:10])
                lines.append(f"    missing seq: {shown}")
        for reason, count in sorted(self.failures.items()):
            lines.append(f"FAIL {count} envelope(s): {reason}")
        for example in self.failure_examples:
            lines.append(f"    {example}")
        if self.envelopes == 0:
            lines.append("verification FAILED: no envelope was checked, 0 envelopes (empty "
                         "capture, wrong file or wrong topic?)")
            return "\n".join(lines)
        verdict = "every envelope verifies" if self.ok else "verification FAILED"
        lines.append(f"{verdict}: {self.envelopes} envelopes from {len(self.devices)} device(s)")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class _Entry:
    hash: bytes
    prev: bytes
    drop: tuple[int, int, bytes] | None


class _DeviceState:
    def __init__(self, device: str) -> None:
        self.report = DeviceReport(device)
        self.by_seq: dict[int, _Entry] = {}
        self.max_seq = -1
        self.meter_signed = MeterSignedTally()
        self.heads: dict[int, bytes] = {}  # seq -> hash, from the device's signed heads


class Verifier:
    """Incremental verifier. ``add`` never raises for bad input: it counts it."""

    MAX_EXAMPLES = 10

    def __init__(self, registry: FleetRegistry) -> None:
        self.registry = registry
        self._devices: dict[str, _DeviceState] = {}
        self._seen: set[bytes] = set()
        self.failures: Counter[str] = Counter()
        self.examples: list[str] = []

    def add_failure(self, reason: str, detail: str) -> None:
        """Count input that never became an envelope (capture framing, MQTT garbage)."""
        self.failures[reason] += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(f"{reason}: {detail}")

    def add(self, data: bytes) -> OpenedEnvelope | None:
        """One envelope (or a chain head: a capture may carry them, see add_head)."""
        if is_head(data):
            self.add_head(data)
            return None
        try:
            opened = open_envelope(data, self.registry.lookup)
        except (SignatureError, RemoteProtocolError) as exc:
            self.add_failure(exc.reason, str(exc))
            return None
        state = self._devices.setdefault(opened.device, _DeviceState(opened.device))
        report = state.report
        if opened.hash in self._seen:
            report.duplicates += 1
            return None
        self._seen.add(opened.hash)
        owner = self.registry.device_of(opened.kid)
        if owner != opened.device:
            report.device_mismatch += 1
        if opened.seq in state.by_seq:
            report.seq_reused += 1
            return None
        if opened.seq < state.max_seq:
            report.reorders += 1
        state.max_seq = max(state.max_seq, opened.seq)
        drop = None
        if opened.kind == KIND_DROP and opened.drop is not None:
            drop = (opened.drop.first, opened.drop.last, opened.drop.last_hash)
            report.dropped_declared += opened.drop.last - opened.drop.first + 1
        state.by_seq[opened.seq] = _Entry(opened.hash, opened.prev, drop)
        report.envelopes += 1
        report.readings += len(opened.readings)
        report.events += len(opened.events)
        tally = state.meter_signed
        for reading in opened.readings:
            tally.add(opened.device, reading.name, reading.meter, reading.value)
        report.meter_signed_ok, report.meter_signed_bad = tally.ok, tally.bad
        report.meter_signed_no_key = tally.no_key
        return opened

    def add_head(self, data: bytes) -> ChainHead | None:
        """A device's signed chain head (status, last will): it proves how far the chain
        went, so envelopes missing after the last one seen show as a missing tail."""
        try:
            head = open_head(data, self.registry.lookup)
        except (SignatureError, RemoteProtocolError) as exc:
            self.add_failure(f"head-{exc.reason}", str(exc))
            return None
        if self.registry.device_of(head.kid) != head.device:
            self.add_failure("head-device-mismatch", f"head of {head.device} signed by a key "
                             f"of {self.registry.device_of(head.kid)}")
            return None
        state = self._devices.setdefault(head.device, _DeviceState(head.device))
        state.heads[head.seq] = head.hash
        return head

    def report(self) -> VerifyReport:
        return VerifyReport({name: self._chain_report(state)
                             for name, state in self._devices.items()},
                            Counter(self.failures), list(self.examples))

    @staticmethod
    def _chain_report(state: _DeviceState) -> DeviceReport:
        """Walk seqs in order; recompute gaps and links from scratch (cheap, and exact
        whatever order envelopes arrived in)."""
        report = state.report
        report.gaps, report.broken_links, report.gap_ranges = 0, 0, []
        _check_heads(state)
        if not state.by_seq:
            return report
        seqs = sorted(state.by_seq)
        report.first_seq, report.last_seq = seqs[0], seqs[-1]
        # Declared drops: (first, last, hash of envelope ``last``). A range may also hold
        # seqs that did arrive (sent just before a crash, PUBACK lost, dropped after the
        # restart): any seq inside a declared range counts as accounted for.
        drops = sorted(entry.drop for entry in state.by_seq.values() if entry.drop)
        if seqs[0] == 0 and state.by_seq[0].prev != GENESIS:
            report.broken_links += 1
        previous = seqs[0]
        for seq in seqs[1:]:
            entry = state.by_seq[seq]
            if seq == previous + 1:
                if entry.prev != state.by_seq[previous].hash:
                    report.broken_links += 1
            else:
                expected_prev = _walk_gap(report, drops, previous + 1, seq)
                if expected_prev is not None and entry.prev != expected_prev:
                    report.broken_links += 1
            previous = seq
        return report


def _check_heads(state: _DeviceState) -> None:
    report = state.report
    report.head_seq = max(state.heads, default=None)
    report.head_mismatch = sum(1 for seq, digest in state.heads.items()
                               if seq in state.by_seq and state.by_seq[seq].hash != digest)
    last = max(state.by_seq, default=-1)
    report.missing_tail = 0 if report.head_seq is None else max(report.head_seq - last, 0)


def _walk_gap(report: DeviceReport, drops: list[tuple[int, int, bytes]], start: int,
              end: int) -> bytes | None:
    """Account for the missing seqs [start, end): declared drops cover some, the rest are
    gaps. Returns the hash the envelope ``end`` must link to when a drop ends exactly at
    ``end - 1``; None when that hash is unknown (a gap, or ``end`` inside a drop range)."""
    seq, link = start, None
    while seq < end:
        cover = next((d for d in drops if d[0] <= seq <= d[1]), None)
        if cover is None:
            nxt = min([d[0] for d in drops if seq < d[0] < end] + [end])
            report.gaps += nxt - seq
            report.gap_ranges.append((seq, nxt - 1))
            seq, link = nxt, None
        else:
            link = cover[2] if cover[1] == end - 1 else None
            seq = cover[1] + 1
    return link


def iter_capture(data: bytes) -> Iterator[bytes | DecodeError]:
    """Split a capture (a CBOR sequence of envelopes, RFC 8742) into envelopes. A damaged
    item yields a DecodeError and the scan resumes at the next envelope start."""
    offset = 0
    while offset < len(data):
        try:
            _, end = dcbor.loads_prefix(data, offset, max_bytes=1 << 20)
        except DecodeError as exc:
            yield exc
            resume = data.find(ENVELOPE_MAGIC, offset + 1)
            if resume < 0:
                return
            offset = resume
            continue
        yield data[offset:end]
        offset = end


def verify_capture(data: bytes, registry: FleetRegistry) -> VerifyReport:
    verifier = Verifier(registry)
    for item in iter_capture(data):
        if isinstance(item, EdgeAgentError):
            verifier.add_failure(item.reason, f"capture framing: {item}")
        else:
            verifier.add(item)
    return verifier.report()
