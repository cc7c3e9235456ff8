from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "p2pnat relay", "p2pnat.relay.tap",
    "p2pnat relay: reach devices behind NAT from any browser", "relay")
