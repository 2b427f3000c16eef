"""OBD-II for the vehicle role (SAE J1979 over ISO 15765-4 CAN, or through an ELM327).

Sans-I/O cores: ``pids`` (PID table, requests, answers), ``isotp`` (ISO 15765-2),
``requester`` (one request, every ECU's answer), ``scheduler`` (poll plan, back-off,
sleep/probe/wake), ``elm327`` (adapter replies), ``odometer`` (integrity events).
Thin asyncio drivers: ``can_driver`` (``obd-can``), ``serial_driver`` (``elm327``), on the
shared loop in ``source``. Config checking by hand in ``options`` (no agent.config here).
"""
