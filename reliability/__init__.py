"""Reliability suite: kills, full disks, damaged and hostile checkpoints, bad input, races."""
