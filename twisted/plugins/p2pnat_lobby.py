from twisted.application.service import ServiceMaker

lobby = ServiceMaker(
    "p2pnat lobby", "p2pnat.lobby.tap",
    "p2pnat lobby: introduces peers for UDP hole punching", "lobby")
