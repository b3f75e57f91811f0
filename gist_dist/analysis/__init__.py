"""Analysis of models and runs: FLOPs, latency, the ZeRO-3 planner, reports, plots, summaries.
These modules import the core (gist_dist.*), never the reverse."""
