"""The daemon's network endpoint: PersonaPlex's client protocol over a websocket (`/api/chat`)."""
