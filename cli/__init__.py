"""The `osmf` command (top room, thin): parse arguments, call one function of a room, print."""
