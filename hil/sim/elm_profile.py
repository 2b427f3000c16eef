"""ELM327-emulator serving a UDS profile: the ``car`` scenario plus every DID of one
profile (``firmware_adapters/obd/profiles``), answered by the right ECU header, with values
from the simulator's battery model at one instant of the driving profile::

    python -m hil.sim.elm_profile --profile vw-meb --time 100 -- -b elm.txt

Everything after ``--`` goes to ELM327-emulator as is (``-b FILE`` batch mode writes the pty
name into FILE). The scenario is built through the emulator's public scenario table
(``elm.obd_message.ObdMessage``: request regex, ``Header`` = what ``ATSH`` set, ISO-TP frames
via ``iso_tp_frames``), so the ELM327 path is tested against the emulator's own AT
handling, header matching and multi-frame output. A 29-bit ECU's header is the low 24 bits
(``ATSH FC007B``; the priority byte goes with ``ATCP``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from firmware_adapters.obd.uds import Profile, load_profile
from hil.sim import uds as sim_uds
from hil.sim.ecu import DrivingProfile


def scenario(profile: Profile, t: float) -> dict[str, dict[str, object]]:
    from elm.obd_message import ELM_FOOTER, iso_tp_frames
    values = sim_uds.physical(DrivingProfile().state(t))
    entries: dict[str, dict[str, object]] = {}
    for did in profile.dids:
        route = did.route
        header = f"{route.request_id & 0xFFFFFF:06X}" if route.extended \
            else f"{route.request_id:X}"
        reply = f"{route.response_id:08X}" if route.extended else f"{route.response_id:03X}"
        data = [f"{b:02X}" for b in sim_uds.answer(did, values)]
        entries[f"UDS_{did.ecu}_{did.did:04X}".upper()] = {
            "Request": f"^22{did.did:04X}" + ELM_FOOTER,
            "Descr": f"{profile.name} {did.ecu} DID {did.did:04X}",
            "Header": header,
            "Response": iso_tp_frames(data, header=reply),
        }
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    rest = args[args.index("--") + 1:] if "--" in args else []
    ours = args[:args.index("--")] if "--" in args else args
    ap = argparse.ArgumentParser(prog="python -m hil.sim.elm_profile",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--time", type=float, default=100.0, help="driving-profile time, s")
    opts = ap.parse_args(ours)
    from elm.interpreter import main as emulator_main
    from elm.obd_message import ObdMessage
    name = f"uds-{opts.profile}"
    ObdMessage[name] = {**scenario(load_profile(opts.profile), opts.time), **ObdMessage["car"]}
    sys.argv = ["elm", "-s", name, *rest]
    emulator_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
