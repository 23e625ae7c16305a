"""Offline tools: load generator (bench/), cluster simulator (sim/), step-time profiler
(profile.py). The serving path never imports them."""
