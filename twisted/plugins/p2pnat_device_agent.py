from twisted.application.service import ServiceMaker

device_agent = ServiceMaker(
    "p2pnat device agent", "p2pnat.agent.tap",
    "p2pnat device agent: keeps a device reachable through its relay", "device-agent")
