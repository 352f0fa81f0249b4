"""Safe build updates on the device: signed bundles, A/B slots, a health-gated switch.

- `bundle_format`: what a bundle holds and how its names and versions are checked (shared with
  `ppx-export bundle`, which writes them);
- `trust`: the ed25519 keys in the trusted keys directory and the signature check;
- `slots`: the two slots under the slots directory and their state file (which slot is good,
  which is on trial), changed only under a lock and by atomic renames;
- `bundle_reader`: a bundle's members, from a tar stream (plain or zstd) or an unpacked
  directory, with tar's extended headers capped;
- `install`: a bundle streamed into the inactive slot, every byte hashed on the way;
- `health`: the gate a newly activated slot passes before it is committed.
"""
