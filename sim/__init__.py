"""The ad system's side: the simulated world and its click model, the judge of served CTR, traffic logs and log replay."""
