"""Slots, queue order and liveness shared with the other gateways through Redis (`state =
"redis://..."`)."""
