"""The control socket the head unit talks to: its protocol and its server."""
